"""Pipeline-parallel GPTModel equals the single-process model with gradient accumulation.

Each spawned rank 0 first builds the whole TP=PP=1 model (before any parallel group exists) and runs all
DP x m micro-batches with gradient accumulation; then every rank builds its chunks with
build_model_chunks, runs one step through get_forward_backward_func (1F1B, GPipe or interleaved), and
returns each parameter's gradient gathered to full shape. Compared in the test process: each
micro-batch's loss on the last stage and every gradient (the tied copy output_layer.weight against the
reference word embedding). fp32, dropout 0, tolerance rtol 1e-5, atol 1e-6 (only summation order differs).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lite import parallel_state as ps
from megatron_lite.config import Config
from megatron_lite.models.gpt.model import GPTModel
from megatron_lite.pipeline import allreduce_embedding_grads, build_model_chunks, get_forward_backward_func
from megatron_lite.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)
SEQ, MBS, VOCAB = 8, 2, 50


def gpt_config(num_layers: int, tp: int = 1, pp: int = 1, vp=None, sp: bool = False, world: int = 1,
               num_microbatches: int = 1, schedule: str = "auto", style: str = "gpt", first=None, last=None,
               overlap: bool = False) -> Config:
    cfg = Config(world_size=world)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = num_layers, 16, 4, SEQ, VOCAB
    m.hidden_dropout = m.attention_dropout = 0.0
    m.make_vocab_size_divisible_by = 8
    if style == "llama":  # untied, RoPE, RMSNorm, SwiGLU, GQA
        m.group_query_attention, m.num_query_groups = True, 2
        m.position_embedding_type, m.swiglu, m.normalization = "rope", True, "RMSNorm"
        m.add_bias_linear, m.untie_embeddings_and_output_weights, m.ffn_hidden_size = False, True, 32
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.virtual_pipeline_model_parallel_size, p.sequence_parallel, p.pipeline_schedule = vp, sp, schedule
    p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers = first, last
    p.overlap_p2p_comm = overlap
    dp = world // (tp * pp)
    cfg.training.micro_batch_size, cfg.training.global_batch_size = MBS, MBS * dp * num_microbatches
    cfg.training.seed = 11
    return cfg.validate()


def microbatches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (count, MBS, SEQ + 1), generator=generator)
    return [{"tokens": ids[i, :, :-1].contiguous(), "labels": ids[i, :, 1:].contiguous()} for i in range(count)]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], None, None, batch["labels"])

    def loss_func(per_token_loss: torch.Tensor):
        loss = per_token_loss.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _reference(num_layers: int, count: int, style: str) -> dict:
    model = GPTModel(gpt_config(num_layers, style=style))
    losses = []
    for batch in microbatches(count):
        loss = model(batch["tokens"], None, None, batch["labels"]).mean()
        (loss / count).backward()
        losses.append(loss.item())
    from megatron_lite.tensor_parallel.utils import gather_full_param  # canonical (unpadded) full tensors
    return {"losses": losses, "grads": {n: gather_full_param(p, p.grad, group=model.tp_group).clone()
                                        for n, p in model.named_parameters()}}


def _run(tp: int, pp: int, cases: list[dict], num_layers: int, style: str = "gpt", ddp: bool = False) -> dict:
    from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
    from megatron_lite.tensor_parallel import allreduce_sequence_parallel_grads
    from megatron_lite.tensor_parallel.utils import gather_full_param

    world = dist.get_world_size()
    dp = world // (tp * pp)
    references = {}
    if dist.get_rank() == 0:
        for case in cases:
            references.setdefault(case["m"] * dp, _reference(num_layers, case["m"] * dp, style))
    results, current_vp = [], "unset"
    for case in cases:
        m, vp = case["m"], case.get("vp")
        if vp != current_vp:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            ps.initialize_model_parallel(tp, pp, vp)
            current_vp = vp
        cfg = gpt_config(num_layers, tp, pp, vp, case.get("sp", False), world, m, case.get("schedule", "auto"), style,
                         case.get("first"), case.get("last"), case.get("overlap", False))
        groups = ps.get_process_groups()
        chunks = build_model_chunks(cfg, lambda pre, post, layers: GPTModel(cfg, pre, post, layers, groups=groups), groups)
        if ddp:
            chunks = [DistributedDataParallel(cfg, chunk, groups=groups) for chunk in chunks]
            finalize, no_sync = finalize_model_grads, [chunk.no_sync for chunk in chunks]
        else:
            def finalize(model_chunks, groups):
                allreduce_sequence_parallel_grads(model_chunks, groups.tp)
                allreduce_embedding_grads(model_chunks, groups)
            no_sync = None
        dp_rank = ps.get_data_parallel_rank()
        data = microbatches(m * dp)[dp_rank * m:(dp_rank + 1) * m]
        iterators = [iter(data) for _ in chunks] if len(chunks) > 1 else iter(data)
        stats: dict = {}
        forward_backward = get_forward_backward_func(cfg, groups)
        losses = forward_backward(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks, num_microbatches=m,
            seq_length=SEQ, micro_batch_size=MBS, config=cfg, no_sync_func=no_sync,
            finalize_model_grads_func=finalize, stats=stats)
        grads = {}
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            for name, param in module.named_parameters():
                grad = param.main_grad if ddp else param.grad
                if not ddp and dp > 1:  # without DDP, average over DP by hand
                    grad = grad.clone()
                    dist.all_reduce(grad, group=ps.get_data_parallel_group())
                    grad /= dp
                grads[name] = gather_full_param(param, grad, group=groups.tp).clone()
        results.append({"case": case, "schedule": forward_backward.schedule, "losses": [d["lm loss"].item() for d in losses], "grads": grads,
                        "dp_rank": dp_rank, "pp_rank": ps.get_pipeline_model_parallel_rank(), "stats": stats})
    return {"references": references, "results": results, "dp": dp}


def _check(outputs: list[dict], pp: int) -> None:
    references, dp = outputs[0]["references"], outputs[0]["dp"]
    for rank, out in enumerate(outputs):
        for result in out["results"]:
            m, label = result["case"]["m"], f"rank {rank} {result['case']}"
            ref = references[m * dp]
            loss_rank = 0 if result["schedule"] == "zbv" else pp - 1  # ZB-V's V ends on rank 0
            if result["pp_rank"] == loss_rank:
                d = result["dp_rank"]
                torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"][d * m:(d + 1) * m]),
                                           **TOL, msg=lambda msg: f"{label} losses: {msg}")
            else:
                assert result["losses"] == [], label
            for name, grad in result["grads"].items():
                ref_name = name if name in ref["grads"] else "embedding.word_embeddings.weight"
                torch.testing.assert_close(grad, ref["grads"][ref_name], **TOL, msg=lambda msg, n=name: f"{label} {n}: {msg}")
            assert result["stats"]["deallocated"] == result["stats"]["sent"], label
        names = {n for o in outputs for r in o["results"][:1] for n in r["grads"]}
        assert names - {"output_layer.weight"} == set(references[outputs[0]["results"][0]["case"]["m"] * dp]["grads"]) - {"output_layer.weight"}


def test_gpt_pp2_1f1b_gpipe_interleaved():
    cases = [{"m": 2, "schedule": "1f1b"}, {"m": 3, "schedule": "1f1b"}, {"m": 4, "schedule": "gpipe"},
             {"m": 4, "vp": 2, "schedule": "interleaved"}, {"m": 3, "first": 1, "last": 3},
             {"m": 3, "schedule": "zb-h1"}, {"m": 2, "schedule": "zb-h1", "overlap": True},
             {"m": 3, "vp": 2, "schedule": "zbv"}, {"m": 2, "vp": 2, "schedule": "zbv", "overlap": True}]
    _check(run_distributed(_run, 2, tp=1, pp=2, cases=cases, num_layers=4), 2)


def test_gpt_pp4_untied_llama():
    cases = [{"m": 4}, {"m": 8, "vp": 2, "schedule": "interleaved"}, {"m": 5, "overlap": True},
             {"m": 6, "vp": 2, "overlap": True, "schedule": "interleaved"}, {"m": 5, "schedule": "zb-h1"},
             {"m": 5, "vp": 2}, {"m": 6, "vp": 2, "overlap": True, "schedule": "zbv"}]  # auto at VP 2 is ZB-V
    _check(run_distributed(_run, 4, tp=1, pp=4, cases=cases, num_layers=8, style="llama"), 4)


def test_gpt_tp2_pp2_dp2_sequence_parallel_with_ddp():
    cases = [{"m": 3, "sp": True, "schedule": "1f1b"}, {"m": 4, "vp": 2, "sp": True, "schedule": "interleaved"},
             {"m": 3, "vp": 2, "sp": True, "schedule": "interleaved"},
             {"m": 3, "vp": 2, "sp": True, "overlap": True, "schedule": "interleaved"},
             {"m": 3, "sp": True, "schedule": "zb-h1", "overlap": True},
             {"m": 3, "vp": 2, "sp": True, "schedule": "zbv"}, {"m": 2, "vp": 2, "sp": True, "overlap": True, "schedule": "zbv"}]
    _check(run_distributed(_run, 8, tp=2, pp=2, cases=cases, num_layers=4, ddp=True), 2)


@pytest.mark.slow
def test_gpt_tp2_pp4_slow():
    cases = [{"m": 4}, {"m": 8, "sp": True}, {"m": 7, "sp": True}, {"m": 8, "vp": 2, "sp": True, "schedule": "interleaved"},
             {"m": 4, "vp": 2, "schedule": "interleaved"}, {"m": 4, "vp": 2, "sp": True, "schedule": "zbv"},
             {"m": 7, "vp": 2, "sp": True, "schedule": "zbv", "overlap": True}, {"m": 6, "vp": 2, "schedule": "zbv"}]
    _check(run_distributed(_run, 8, tp=2, pp=4, cases=cases, num_layers=8, style="llama"), 4)
