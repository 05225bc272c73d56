"""Dropless MoE in every layout equals one process: EP 1/2/4, expert TP, TP + SP (parallel folding, EP > DP),
PP, DP with the distributed optimizer, both token dispatchers.

Each layout trains STEPS steps (SGD with momentum and clipping, so a gradient difference shows up linearly
in the parameters) of a 2-layer GPT whose layers are both MoE (4 experts, top-2, SwiGLU experts, a gated
shared expert, balancing loss and z-loss on). Compared with the one-process run of the same global batch
(fp32): the loss of every step within 1e-6 relative; every parameter's total update (gathered to its full
shape, experts from their EP ranks) within 1e-5 of that tensor's largest update (plus 4 fp32 ulps of the
parameter, the rounding of end - start); the global grad norm within
1e-5 relative on every rank (each element counted once: dense shards over TP x PP, expert shards over
ETP x EP x PP). The two dispatchers agree with each other the same way.

With a capacity factor, drops are decided over each rank's local tokens before dispatch (as in Megatron), so
they depend on how tokens are split over ranks: TP + SP, CP and the micro-batch size change them. EP, ETP, PP,
DP at a fixed micro-batch size and the dispatcher do not: those layouts (micro-batch 1 = one sample) are
compared with the one-process run here, for both drop policies and with padding to capacity.
"""
from __future__ import annotations

import pytest
import torch

from megatron_lite import parallel_state as ps
from megatron_lite.config import Config
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
from megatron_lite.optimizer import get_megatron_optimizer
from megatron_lite.testing import run_distributed

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 64, 16, 8, 2
LOSS_RTOL, UPDATE_TOL, NORM_RTOL = 1e-6, 1e-5, 1e-5


def make_config(world: int, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, dispatcher: str = "alltoall",
                dist_opt: bool = False, grouped: bool = False, bias: bool = False, capacity: str | None = None,
                strategy: str | None = None) -> Config:
    cfg = Config(world_size=world)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.ffn_hidden_size = 2, 32, 4, SEQ, 64
    m.vocab_size, m.make_vocab_size_divisible_by, m.swiglu, m.add_bias_linear = VOCAB, 8, True, False
    m.hidden_dropout = m.attention_dropout = 0.0
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel = tp, pp, tp > 1
    p.expert_model_parallel_size, p.expert_tensor_parallel_size = ep, etp
    p.use_distributed_optimizer, p.ddp_bucket_size, p.data_parallel_sharding_strategy = dist_opt, 3000, strategy
    moe = cfg.moe
    moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size = 4, 2, 16
    moe.moe_token_dispatcher_type, moe.moe_grouped_gemm = dispatcher, grouped
    moe.moe_shared_expert_intermediate_size, moe.moe_shared_expert_gate = 32, True
    moe.moe_aux_loss_coeff, moe.moe_z_loss_coeff = 0.01, 0.001
    if bias:  # aux-loss-free balancing: sigmoid scores, expert bias updated after every step
        moe.moe_router_score_function, moe.moe_router_enable_expert_bias, moe.moe_router_bias_update_rate = "sigmoid", True, 0.05
        moe.moe_router_load_balancing_type = "seq_aux_loss"
    if capacity is not None:  # token dropping, decided over each rank's local tokens (one sample per micro-batch)
        moe.moe_expert_capacity_factor, moe.moe_token_drop_policy = 1.0, capacity.split("+")[0]
        moe.moe_pad_expert_input_to_capacity = capacity.endswith("+pad")
    cfg.training.micro_batch_size, cfg.training.global_batch_size, cfg.training.seed = 1, GLOBAL_BATCH, 5
    o = cfg.optimizer
    o.optimizer, o.lr, o.weight_decay, o.clip_grad = "sgd", 1.0, 0.0, 0.5
    return cfg.validate()


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(300 + step))


def forward_step(data_iterator, model):
    sample = next(data_iterator)
    output = model(sample["tokens"], None, None, sample["labels"])
    return output, lambda per_token: (per_token.mean(), {"lm loss": per_token.mean().detach()})


def full_params(chunks, groups) -> dict:
    from megatron_lite.tensor_parallel import gather_full_param
    from megatron_lite.tensor_parallel.shard_spec import shard_spec_of
    return {name: gather_full_param(p, group=groups.etp if shard_spec_of(p).axis == "etp" else groups.tp).float().clone()
            for c in chunks for name, p in c.named_parameters()}


def train(cfg: Config) -> dict:
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.pipeline import build_model_chunks, get_forward_backward_func

    groups = ps.get_process_groups()
    chunks = build_model_chunks(cfg, lambda pre, post, layers: GPTModel(cfg, pre, post, layers, groups=groups), groups)
    start = full_params(chunks, groups)
    model = [DistributedDataParallel(cfg, chunk, groups=groups) for chunk in chunks]
    opt = get_megatron_optimizer(cfg, model, groups)
    dp, dp_rank, num_micro = groups.dp.size, groups.dp.rank, cfg.num_microbatches
    forward_backward = get_forward_backward_func(cfg, groups)
    norms, losses = [], []
    for step in range(STEPS):
        opt.zero_grad()
        local = batch(step).chunk(dp)[dp_rank]
        data = [{"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous()} for mb in local.chunk(num_micro)]
        out = forward_backward(forward_step_func=forward_step, data_iterator=iter(data), model=model,
                               num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=1, config=cfg,
                               no_sync_func=model[0].no_sync, finalize_model_grads_func=finalize_model_grads,
                               grad_scale_func=opt.scale_loss)
        if out:
            losses.append(sum(float(d["lm loss"]) for d in out) / len(out))
        ok, norm, _ = opt.step()
        assert ok
        norms.append(norm)
    for chunk in model:
        chunk.finish_param_sync()
    end = full_params(chunks, groups)
    from megatron_lite.models.moe.moe_layer import MoELayer
    dropped = sum(float(m.stats.get("tokens_dropped", 0.0)) for c in chunks for m in c.modules() if isinstance(m, MoELayer))
    return {"updates": {name: end[name] - start[name] for name in end}, "params": end, "norms": norms, "losses": losses,
            "dropped": dropped,
            "buffers": {name: b.clone() for c in chunks for name, b in c.named_parameters() if not b.requires_grad}}


def _layouts(world: int, layouts: list[dict]) -> list[dict]:
    results = []
    for layout in layouts:
        ps.initialize_model_parallel(layout.get("tp", 1), layout.get("pp", 1), None, 1, layout.get("ep", 1),
                                     layout.get("etp"))
        results.append(train(make_config(world, **layout)))
        ps.destroy_model_parallel()
    return results


def _merge(rank_results: list[list[dict]], index: int) -> dict:
    updates, buffers, params = {}, {}, {}
    for per_rank in rank_results:
        updates.update(per_rank[index]["updates"])
        buffers.update(per_rank[index]["buffers"])
        params.update(per_rank[index]["params"])
    per_rank = [r[index]["losses"] for r in rank_results if r[index]["losses"]]
    return {"updates": updates, "buffers": buffers, "params": params, "dropped": sum(r[index]["dropped"] for r in rank_results), "losses": [sum(s) / len(per_rank) for s in zip(*per_rank)],
            "all_norms": [r[index]["norms"] for r in rank_results]}


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL), what
    # (PP adds the tied embedding's last-stage copy, output_layer.weight: not in the one-process model)
    assert set(got["updates"]) - {"output_layer.weight"} == set(ref["updates"]), what
    for name, update in ref["updates"].items():
        scale = float(update.abs().max())
        # (an expert bias moves by +-rate per step and may be back at 0 after two steps: compared exactly below)
        assert scale > 0 or name in ref["buffers"], f"{what}: {name} was never updated: the comparison would be vacuous"
        diff = float((got["updates"][name] - update).abs().max())
        # plus the rounding of the parameters themselves (an update is end - start of fp32 values)
        rounding = 4 * torch.finfo(torch.float32).eps * float(ref["params"][name].abs().max())
        assert diff <= UPDATE_TOL * scale + rounding, f"{what}: {name} differs by {diff:.2e} (largest update {scale:.2e})"
    for name, value in ref["buffers"].items():  # expert biases
        torch.testing.assert_close(got["buffers"][name], value, rtol=0, atol=1e-7, msg=lambda m: f"{what}: {name}: {m}")
    for norms in got["all_norms"]:
        assert norms == pytest.approx(ref["all_norms"][0], rel=NORM_RTOL), what
    assert got["dropped"] == ref["dropped"], what  # the same pairs dropped (none when dropless)


LAYOUTS_2 = [dict(ep=2, dispatcher="alltoall", dist_opt=True), dict(ep=2, dispatcher="allgather", grouped=True),
             dict(ep=2, dispatcher="alltoall", capacity="probs")]
LAYOUTS_4 = [
    dict(ep=4, dispatcher="alltoall"),
    dict(ep=4, dispatcher="allgather", dist_opt=True),
    dict(tp=2, ep=2, etp=2, dispatcher="alltoall", dist_opt=True),  # expert TP
    dict(tp=2, ep=4, etp=1, dispatcher="alltoall"),  # folding: EP 4 over TP 2 x DP 2
    dict(tp=2, ep=4, etp=1, dispatcher="allgather", dist_opt=True),
    dict(pp=2, ep=2, dispatcher="alltoall", dist_opt=True),
    dict(pp=2, ep=2, dispatcher="allgather"),
    dict(ep=4, dispatcher="alltoall", bias=True),
    dict(ep=4, dispatcher="alltoall", capacity="position+pad"),
    dict(tp=2, ep=2, etp=1, dispatcher="alltoall", strategy="optim_grads"),  # ZeRO-2: expert grads sharded over EDP
    dict(pp=2, ep=2, dispatcher="allgather", capacity="probs"),
]
MODELS = {"bias": dict(bias=True), "probs": dict(capacity="probs"), "position+pad": dict(capacity="position+pad")}


def _model(layout: dict) -> str | None:
    """Which one-process reference a layout compares with (the model settings it changes)."""
    return "bias" if layout.get("bias") else layout.get("capacity")


@pytest.fixture(scope="module")
def references() -> dict:
    layouts = [dict(dispatcher="alltoall"), dict(dispatcher="allgather")] + \
        [dict(dispatcher="alltoall", **settings) for settings in MODELS.values()]
    results = run_distributed(_layouts, 1, world=1, layouts=layouts)
    merged = [_merge(results, i) for i in range(len(layouts))]
    _assert_same(merged[1], merged[0], "one process, allgather vs alltoall")
    assert merged[0]["dropped"] == 0 and all(m["dropped"] > 0 for m in merged[3:]), [m["dropped"] for m in merged]
    return {None: merged[0], **dict(zip(MODELS, merged[2:]))}


def test_moe_on_2_ranks_equals_one_process(references):
    results = run_distributed(_layouts, 2, world=2, layouts=LAYOUTS_2)
    for index, layout in enumerate(LAYOUTS_2):
        _assert_same(_merge(results, index), references[_model(layout)], str(layout))


@pytest.mark.slow
def test_moe_on_4_ranks_equals_one_process(references):
    results = run_distributed(_layouts, 4, world=4, layouts=LAYOUTS_4, timeout=600)
    for index, layout in enumerate(LAYOUTS_4):
        _assert_same(_merge(results, index), references[_model(layout)], str(layout))
