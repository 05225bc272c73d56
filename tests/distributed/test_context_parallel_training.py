"""Context parallelism through the real training engine: pretrain_gpt's get_batch (CP slicing), loss_func
(masked mean across CP) and forward_step, the pipeline schedules, DDP (grads averaged over DP x CP) and
the (distributed) optimizer, with recompute, document masks and both position embeddings, equal the
one-process run: per-step losses (rel 1e-5) and every parameter after the steps (rtol 1e-5, atol 2e-6,
the tolerance of test_ddp_gpt: Adam maps ~1e-7 gradient differences of near-zero entries to ~1e-7
weight differences). Dropout is 0 (see test_context_parallel.py for why).
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from megatron_lite import parallel_state as ps
from megatron_lite.config import Config
from megatron_lite.testing import run_distributed

VOCAB, SEQ, GLOBAL_BATCH, STEPS, EOD = 64, 32, 4, 2, 0
PARAM_TOL = dict(rtol=1e-5, atol=2e-6)


def make_config(world: int, case: dict) -> Config:
    cfg = Config(world_size=world)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 4, 32, 4, SEQ
    m.vocab_size, m.make_vocab_size_divisible_by = VOCAB, 8
    m.hidden_dropout = m.attention_dropout = 0.0
    if case.get("style") == "llama":
        m.num_attention_heads, m.group_query_attention, m.num_query_groups = 8, True, 2
        m.position_embedding_type, m.swiglu, m.normalization = "rope", True, "RMSNorm"
        m.add_bias_linear, m.untie_embeddings_and_output_weights, m.ffn_hidden_size = False, True, 64
    if world > 1:
        m.recompute_granularity = case.get("recompute")
        if m.recompute_granularity == "full":
            m.recompute_method, m.recompute_num_layers = "uniform", 1
    p = cfg.parallel
    if world > 1:
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size = case.get("tp", 1), case.get("pp", 1)
        p.context_parallel_size, p.cp_comm_type = case["cp"], case["comm"]
        p.sequence_parallel, p.use_distributed_optimizer = case.get("sp", False), case.get("dist_opt", False)
    d = cfg.data
    d.reset_attention_mask = d.reset_position_ids = d.eod_mask_loss = case.get("documents", False)
    cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.training.seed = 1, GLOBAL_BATCH, 11
    o = cfg.optimizer
    o.lr, o.weight_decay, o.clip_grad, o.adam_eps = 3e-3, 0.1, 0.5, 1e-6
    return cfg.validate()


def samples(step: int, documents: bool) -> list[dict]:
    """GLOBAL_BATCH samples; with documents, end-of-document tokens inside and across chunk boundaries,
    and one sample whose tokens 8..23 are all end-of-document tokens: under CP 2 every token of rank 1
    (chunks 1 and 2) is loss-masked."""
    from megatron_lite.data.gpt_dataset import get_ltor_masks_and_position_ids
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))
    if documents:
        ids[0, [5, 15, 16]] = EOD
        ids[1, 8:24] = EOD
        ids[2, [7, 8, 24]] = EOD
    out = []
    for row in ids:
        tokens = row[:-1].contiguous()
        loss_mask, position_ids, mask = get_ltor_masks_and_position_ids(tokens.numpy(), EOD, documents, documents, documents)
        sample = {"tokens": tokens[None], "labels": row[1:][None].contiguous(),
                  "loss_mask": torch.from_numpy(loss_mask)[None], "position_ids": torch.from_numpy(position_ids)[None]}
        if documents:
            sample["attention_mask"] = torch.from_numpy(np.asarray(mask))[None]
        out.append(sample)
    return out


def train(cfg: Config, documents: bool) -> dict:
    import pretrain_gpt
    from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.optimizer import get_megatron_optimizer
    from megatron_lite.pipeline import build_model_chunks, get_forward_backward_func
    from megatron_lite.tensor_parallel import gather_full_param
    groups = ps.get_process_groups() if ps.model_parallel_is_initialized() else None
    from megatron_lite.process_groups import ProcessGroups
    groups = groups or ProcessGroups.single()
    chunks = build_model_chunks(cfg, lambda pre, post, layers: GPTModel(cfg, pre, post, layers, groups=groups), groups)
    model = [DistributedDataParallel(cfg, chunk, groups=groups) for chunk in chunks]
    opt = get_megatron_optimizer(cfg, model, groups)
    forward_backward = get_forward_backward_func(cfg, groups)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        local = samples(step, documents)[groups.dp.rank::groups.dp.size]
        out = forward_backward(forward_step_func=partial(pretrain_gpt.forward_step, cfg), data_iterator=iter(local),
                               model=model, num_microbatches=cfg.num_microbatches, seq_length=SEQ, micro_batch_size=1,
                               config=cfg, no_sync_func=model[0].no_sync, finalize_model_grads_func=finalize_model_grads,
                               grad_scale_func=opt.scale_loss)
        ok, _, _ = opt.step()
        assert ok
        losses.append([float(d["lm loss"]) for d in out])
    for chunk in model:
        chunk.finish_param_sync()
    params = {name: gather_full_param(p, group=groups.tp).float().clone() for c in chunks for name, p in c.named_parameters()}
    assert all(torch.isfinite(p).all() for p in params.values())
    return {"params": params, "losses": losses, "dp_rank": groups.dp.rank, "last": groups.is_last_stage}


def _run(world: int, cases: list[dict]) -> list[dict]:
    if world > 1:
        ps.initialize_model_parallel(cases[0].get("tp", 1), cases[0].get("pp", 1), context_parallel_size=cases[0]["cp"])
    return [train(make_config(world, case), case.get("documents", False)) for case in cases]


def _merged(rank_results: list[list[dict]], index: int) -> dict:
    """One case's parameters from every rank, and the per-step losses of all micro-batches (DP ranks
    interleaved as the samples were dealt)."""
    params, losses = {}, {}
    for per_rank in rank_results:
        result = per_rank[index]
        params.update(result["params"])
        if result["last"]:
            losses[result["dp_rank"]] = result["losses"]
    steps = [[value for dp_rank in sorted(losses) for value in losses[dp_rank][step]] for step in range(STEPS)]
    return {"params": params, "losses": [sorted(s) for s in steps]}


def _check(got: dict, ref: dict, tag: str) -> None:
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert a == pytest.approx(b, rel=1e-5), f"{tag} step {step} losses {a} vs {b}"
    extra = set(got["params"]) - set(ref["params"])
    assert extra <= {"output_layer.weight"} and set(ref["params"]) <= set(got["params"]), tag
    if extra:  # the tied copy on the last stage stays equal to the embedding
        torch.testing.assert_close(got["params"]["output_layer.weight"], ref["params"]["embedding.word_embeddings.weight"],
                                   **PARAM_TOL)
    for name, value in ref["params"].items():
        torch.testing.assert_close(got["params"][name], value, **PARAM_TOL, msg=lambda m, n=name: f"{tag} {n}: {m}")


CASES = [
    # CP 2 x PP 2 x DP 2, distributed optimizer: Llama (RoPE, GQA with 2 groups) + documents, ring, full recompute;
    # GPT-2 (learned positions) + documents, Ulysses (K/V replicated), selective recompute; all-gather, plain causal.
    dict(cp=2, pp=2, dist_opt=True, comm="p2p", style="llama", documents=True, recompute="full"),
    dict(cp=2, pp=2, dist_opt=True, comm="a2a", style="gpt2", documents=True, recompute="selective"),
    dict(cp=2, pp=2, dist_opt=True, comm="all_gather", style="llama", documents=False),
]


def test_cp2_pp2_dp2_distributed_optimizer_recompute_documents():
    references = {}
    for case in CASES:
        key = (case["style"], case.get("documents", False))
        if key not in references:
            references[key] = _merged(run_distributed(_run, 1, world=1, cases=[case]), 0)
    results = run_distributed(_run, 8, world=8, cases=CASES, timeout=400)
    for index, case in enumerate(CASES):
        _check(_merged(results, index), references[(case["style"], case.get("documents", False))], str(case))
