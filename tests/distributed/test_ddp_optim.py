"""DDP + optimizer equivalence on a toy model: every DP layout, with and without the distributed
optimizer and overlap, with gradient accumulation, ends with the single-process parameters.

Tolerances: fp32 parameters within 1e-6 relative + 1e-6 absolute (weights are ~0.1: Adam turns last-bit
differences of near-zero gradients, summed in another order, into ~1e-7 steps) of the one-process run after 3 steps;
bf16 within 2 bf16 ulps (rtol 1.6e-2, atol 1e-3) of a one-process bf16 run (grad sums reach fp32 in a
different order, so a main weight can round to the neighbouring bf16 value). Grad norms within 1e-5.
Memory within 2% of Megatron's bytes/param table; dp-group communication bytes exactly the theory.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from megatron_lite import collectives, parallel_state
from megatron_lite.config import Config
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec
from megatron_lite.optimizer import get_megatron_optimizer, memory_report
from megatron_lite.testing import run_distributed

HIDDEN, FFN, GLOBAL_BATCH, MICRO_BATCH, STEPS = 32, 64, 8, 1, 3


class ToyModel(nn.Module):
    """Two-layer MLP whose parameters carry the metadata the GPT model's do."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.norm = nn.LayerNorm(FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)
        for p in (self.fc1.weight, self.fc1.bias):  # "column parallel" (TP = 1 here)
            set_shard_spec(p, ShardSpec(partition_dim=0))
        set_shard_spec(self.fc2.weight, ShardSpec(partition_dim=1))
        for p in (self.norm.weight, self.norm.bias, self.fc2.bias):  # replicated over TP
            set_shard_spec(p, ShardSpec())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


def make_config(world: int, precision: str = "fp32", dist_opt: bool = False, overlap: bool = False,
                optimizer: str = "adam", clip: float = 0.05, strategy: str | None = None, offload: float | None = None,
                nvme: float | None = None, **opt_overrides) -> Config:
    """`strategy` sets --data-parallel-sharding-strategy (sharded strategies imply the distributed optimizer);
    `offload` turns on --optimizer-cpu-offload with that --optimizer-offload-fraction; `nvme` the same fraction
    to --optimizer-nvme-offload-dir (a temporary directory), stepped in chunks of 1000 elements."""
    cfg = Config(world_size=world)
    cfg.training.micro_batch_size, cfg.training.global_batch_size = MICRO_BATCH, GLOBAL_BATCH
    dist_opt = dist_opt or strategy not in (None, "no_shard")
    cfg.parallel.use_distributed_optimizer = dist_opt
    cfg.parallel.data_parallel_sharding_strategy = strategy
    cfg.parallel.overlap_grad_reduce = overlap
    cfg.parallel.overlap_param_gather = overlap and dist_opt
    cfg.parallel.ddp_bucket_size = 1000  # several buckets, some params straddling DP shard boundaries
    o = cfg.optimizer
    o.optimizer, o.lr, o.weight_decay, o.clip_grad = optimizer, 1e-2, 0.1, clip
    o.bf16, o.fp16 = precision == "bf16", precision == "fp16"
    o.optimizer_cpu_offload, o.optimizer_offload_fraction = offload is not None, 1.0 if offload is None else offload
    if nvme is not None:
        o.optimizer_nvme_offload_dir = os.path.join(tempfile.gettempdir(), f"megatron_lite_test_nvme_{os.getppid()}")
        o.optimizer_offload_fraction, o.optimizer_offload_chunk_mb = nvme, 4000 / 2**20
    for key, value in opt_overrides.items():
        setattr(o, key, value)
    return cfg


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, HIDDEN, generator=gen), torch.randn(GLOBAL_BATCH, HIDDEN, generator=gen)


def _reduction_bytes(dp_name: str) -> int:
    """Gradient-reduction bytes so far (ZeRO-3 also all-gathers parameters in every micro-batch)."""
    return sum(collectives.bytes_for(op=op, group=dp_name) for op in ("all_reduce", "reduce_scatter"))


def train(cfg: Config, steps: int = STEPS, inject_inf_at: int | None = None) -> dict:
    """Train the toy model; return final params, per-step stats, comm bytes and the memory report."""
    torch.manual_seed(1234)
    model = ToyModel().to(cfg.params_dtype)
    groups = parallel_state.get_process_groups()
    ddp = DistributedDataParallel(cfg, model, groups=groups)
    opt = get_megatron_optimizer(cfg, [ddp], groups)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * dp)
    out = {"norms": [], "ok": [], "scales": [], "params_per_step": [], "early_dp_bytes": 0, "overlapped": False,
           "inspect_bytes": 0, "num_micro": num_micro}
    # The DP group's name in the byte counters ('dp'; at DP = 1 it is the same one-rank group as 'tp').
    dp_name = parallel_state.group_name(parallel_state.get_data_parallel_group(with_context_parallel=True))
    collectives.reset_comm_stats()
    for step in range(steps):
        opt.zero_grad()
        dp_bytes_at_start = _reduction_bytes(dp_name)
        inputs, targets = batch(step)
        local_x, local_y = inputs.chunk(dp)[dp_rank], targets.chunk(dp)[dp_rank]
        for i, (x, y) in enumerate(zip(local_x.chunk(num_micro), local_y.chunk(num_micro))):
            last = i == num_micro - 1
            with nullcontext() if last else ddp.no_sync():
                loss = ((ddp(x.to(cfg.params_dtype)).float() - y) ** 2).mean() / num_micro
                opt.scale_loss(loss).backward()
            if not last:
                out["early_dp_bytes"] += _reduction_bytes(dp_name) - dp_bytes_at_start  # must stay 0: no reduction yet
            elif _reduction_bytes(dp_name) > dp_bytes_at_start:
                out["overlapped"] = True  # some bucket started before finish_grad_sync
        finalize_model_grads([ddp], groups)
        if inject_inf_at == step and torch.distributed.get_rank() == 0:
            next(iter(model.parameters())).main_grad.view(-1)[0] = float("inf")  # one rank, after the sync
        ok, norm, _ = opt.step()
        ddp.finish_param_sync()
        out["ok"].append(ok)
        out["norms"].append(norm)
        out["scales"].append(float(opt.get_loss_scale().item()))
        inspect_start = collectives.bytes_for(op="all_gather", group=dp_name)
        # (ZeRO-3: sharded_state() gathers the whole model; those bytes are the test's, not the step's)
        out["params_per_step"].append({n: p.detach().float().clone() for n, p in ddp.sharded_state().items()})
        out["inspect_bytes"] += collectives.bytes_for(op="all_gather", group=dp_name) - inspect_start
    out["dp_bytes"] = {op: collectives.bytes_for(op=op, group=dp_name) for op in ("all_reduce", "reduce_scatter", "all_gather")}
    out["grad_numel"] = sum(b.full_grad_bytes() for b in ddp.param_and_grad_buffers)
    out["grad_bytes_at_rest"] = sum(b.grad_bytes() for b in ddp.param_and_grad_buffers)
    out["peak_grad_bytes"] = sum(b.peak_grad_bytes for b in ddp.param_and_grad_buffers)
    out["param_buffer_bytes"] = sum(bucket.numel * torch.empty((), dtype=b.param_dtype).element_size()
                                    for b in ddp.param_and_grad_buffers for bucket in b.buckets)
    ddp.finish_param_sync()  # (ZeRO-3: back to rest, shards only)
    out["memory"] = memory_report([ddp], opt)
    out["params"] = out["params_per_step"][-1]
    out["param_state"] = opt.get_parameter_state()
    if opt.nvme is not None:  # the per-rank files exist while training and are gone after close()
        path = opt.nvme.path
        out["nvme_files"] = sorted(os.listdir(path))
        opt.close()
        out["nvme_removed"] = not os.path.exists(path)
        try:
            os.rmdir(os.path.dirname(path))  # the shared test directory, once the last rank is done
        except OSError:
            pass
    return out


CONFIGS = [  # (name, kwargs)
    ("fp32", {}), ("fp32_distopt", {"dist_opt": True}), ("fp32_overlap", {"overlap": True}),
    ("fp32_distopt_overlap", {"dist_opt": True, "overlap": True}), ("fp32_sgd_distopt", {"dist_opt": True, "optimizer": "sgd"}),
    ("bf16", {"precision": "bf16"}), ("bf16_distopt_overlap", {"precision": "bf16", "dist_opt": True, "overlap": True}),
    ("fp32_zero2", {"strategy": "optim_grads"}), ("fp32_zero2_overlap", {"strategy": "optim_grads", "overlap": True}),
    ("bf16_zero2_overlap", {"precision": "bf16", "strategy": "optim_grads", "overlap": True}),
    ("fp32_offload", {"offload": 1.0}), ("fp32_zero2_offload_half", {"strategy": "optim_grads", "offload": 0.5}),
    ("bf16_distopt_overlap_offload_half", {"precision": "bf16", "dist_opt": True, "overlap": True, "offload": 0.5}),
    ("fp32_nvme", {"nvme": 1.0}), ("fp32_zero2_nvme_half", {"strategy": "optim_grads", "nvme": 0.5}),
    # ZeRO-3 on the toy: one unit (a module without sharding_plan()), gathered for every micro-batch's
    # forward and backward; the GPT model's per-layer units are tested in test_zero3.py.
    ("fp32_zero3", {"strategy": "optim_grads_params"}), ("fp32_zero3_overlap", {"strategy": "optim_grads_params", "overlap": True}),
    ("bf16_zero3_overlap", {"precision": "bf16", "strategy": "optim_grads_params", "overlap": True}),
    ("fp32_zero3_offload_half", {"strategy": "optim_grads_params", "offload": 0.5}),
]
# CPU offload steps the same Adam arithmetic (on CPU, the same fused kernel) on a host copy: the results must
# be bitwise those of the same run without offload.
OFFLOAD_TWIN = {"fp32_offload": "fp32", "fp32_zero2_offload_half": "fp32_zero2",
                "bf16_distopt_overlap_offload_half": "bf16_distopt_overlap",
                "fp32_nvme": "fp32", "fp32_zero2_nvme_half": "fp32_zero2"}
# ZeRO-2 does ZeRO-1's arithmetic on the same buckets (one reduce-scatter of the same sums), so its results
# must be bitwise those of the ZeRO-1 run with the same precision and overlap.
ZERO2_TWIN = {"fp32_zero2": "fp32_distopt", "fp32_zero2_overlap": "fp32_distopt_overlap",
              "bf16_zero2_overlap": "bf16_distopt_overlap"}


def _all_configs(world: int) -> dict:
    parallel_state.initialize_model_parallel()
    results = {name: train(make_config(world, **kw)) for name, kw in CONFIGS}
    for r in results.values():
        r.pop("params_per_step")
    return results


def _check_against_reference(results: dict, reference: dict, dp: int) -> None:
    for name, kwargs in CONFIGS:
        got, ref = results[name], reference[name]
        bf16 = kwargs.get("precision") == "bf16"
        rtol, atol = (1.6e-2, 1e-3) if bf16 else (1e-6, 1e-6)
        for key in ref["params"]:
            torch.testing.assert_close(got["params"][key], ref["params"][key], rtol=rtol, atol=atol, msg=lambda m: f"{name} {key}: {m}")
            for skey, value in ref["param_state"][key].items():  # fp32 main params and moments, gathered
                torch.testing.assert_close(got["param_state"][key][skey], value, rtol=max(rtol, 1e-5), atol=max(atol, 1e-6),
                                           msg=lambda m: f"{name} {key} {skey}: {m}")
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5 if not bf16 else 1e-2), name
        assert got["early_dp_bytes"] == 0, f"{name}: communication during an accumulation micro-batch"
        if kwargs.get("overlap") and dp > 1:
            assert got["overlapped"], f"{name}: no bucket started during backward"
        # Communication per step: all-reduce of all grads, or reduce-scatter of grads + all-gather of params.
        b = got["dp_bytes"]
        sharded = kwargs.get("dist_opt") or kwargs.get("strategy") is not None
        if dp == 1:
            pass  # the one-rank DP group is also the TP/MP group, whose counters hold the grad-norm scalars
        elif kwargs.get("strategy") == "optim_grads_params":  # ZeRO-3: params gathered per micro-batch, twice
            assert b["reduce_scatter"] == STEPS * got["grad_numel"] and b["all_reduce"] == 0, (name, b)
            assert b["all_gather"] - got["inspect_bytes"] == STEPS * 2 * got["num_micro"] * got["param_buffer_bytes"], (name, b)
        elif sharded:  # ZeRO-1 and ZeRO-2 (one reduce-scatter per step, whatever the micro-batches): plain DP's volume
            assert b["reduce_scatter"] == STEPS * got["grad_numel"] and b["all_reduce"] == 0, (name, b)
            assert b["all_gather"] == STEPS * got["param_buffer_bytes"], (name, b)
        else:
            assert b["all_reduce"] == STEPS * got["grad_numel"] and b["reduce_scatter"] == b["all_gather"] == 0, (name, b)
        _check_memory_table(name, kwargs, got, dp)
        _check_twins(name, kwargs, got, results, dp)


def _check_memory_table(name: str, kwargs: dict, got: dict, dp: int) -> None:
    bf16 = kwargs.get("precision") == "bf16"
    sharded = kwargs.get("dist_opt") or kwargs.get("strategy") is not None
    zero2 = kwargs.get("strategy") in ("optim_grads", "optim_grads_params")
    zero3 = kwargs.get("strategy") == "optim_grads_params"
    # Memory: Megatron's bytes/param table (Adam; SGD has one state instead of two); ZeRO-2 moves the
    # fp32 grad (4 bytes) into the sharded part: fp32 4 + 12/d, bf16 2 + 16/d.
    mem = got["memory"]
    per_state = 4 if kwargs.get("optimizer") == "sgd" else 8
    base = {True: 2 + 4, False: 4 + 4}[bf16] - (4 if zero2 else 0)
    sharded_bytes = (4 if bf16 else 0) + per_state + (4 if zero2 else 0)  # main copy (bf16) + states (+ grads)
    if zero3:  # ZeRO-3 moves the model params (2 or 4 bytes) into the sharded part too: bf16 18/d, fp32 16/d
        base, sharded_bytes = 0, sharded_bytes + (2 if bf16 else 4)
    expected = base + sharded_bytes / (dp if sharded else 1)
    # CPU offload: fraction F of the shard's main params + moments (12 bytes) on the host; an fp32 model
    # param then needs a host main copy (4 bytes) it did not need on the device.
    fraction = kwargs.get("offload") or kwargs.get("nvme") or 0.0
    offloaded = 12 * fraction / (dp if sharded else 1)
    expected += (0 if bf16 else 4) * fraction / (dp if sharded else 1)
    where, elsewhere = ("disk", "host") if "nvme" in kwargs else ("host", "disk")
    assert mem["bytes_per_param"] == pytest.approx(expected, rel=0.02), (name, mem, expected)
    assert mem[where] / mem["num_params"] == pytest.approx(offloaded, rel=0.02, abs=1e-9), (name, mem, offloaded)
    assert mem[elsewhere] == 0 and mem["device_bytes_per_param"] == pytest.approx(expected - offloaded, rel=0.02)
    if "nvme" in kwargs:
        assert got["nvme_files"] == ["exp_avg.f32", "exp_avg_sq.f32", "param.f32"] and got["nvme_removed"], name


def _check_twins(name: str, kwargs: dict, got: dict, results: dict, dp: int) -> None:
    """Offload and ZeRO-2 against their twins (another configuration of the same run), and ZeRO-2's
    gradient memory at rest and at peak."""
    zero2 = kwargs.get("strategy") in ("optim_grads", "optim_grads_params")  # (ZeRO-3's grads are ZeRO-2's)
    if name in OFFLOAD_TWIN:
        twin = results[OFFLOAD_TWIN[name]]
        for key in twin["params"]:
            diff = (got["params"][key] - twin["params"][key]).abs().max().item()
            if kwargs.get("offload") == 1.0:  # whole tensors: the same kernel over the same elements, bitwise
                assert diff == 0.0, f"{name} {key}: not the no-offload result ({diff:.2e})"
            else:  # a tensor split at the host/device boundary is vectorised differently: last-bit FMA
                torch.testing.assert_close(got["params"][key], twin["params"][key], rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"{name} {key}: {m}")
        # Same gradients; a split tensor only regroups the norm's sum of squares.
        assert got["norms"] == pytest.approx(twin["norms"], rel=0 if kwargs.get("offload") == 1.0 else 1e-6), name
    if zero2:  # the accumulation rule's cost: the full grad lives until the last micro-batch, shards at rest
        assert got["grad_bytes_at_rest"] == got["grad_numel"] // dp, name
        assert got["peak_grad_bytes"] == got["grad_numel"] + got["grad_numel"] // dp, name
    if name in ZERO2_TWIN:
        twin = results[ZERO2_TWIN[name]]
        for key in twin["params"]:
            assert torch.equal(got["params"][key], twin["params"][key]), f"{name} {key}: not bitwise ZeRO-1's"
        assert got["norms"] == twin["norms"], name


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_all_configs, 1, world=1)[0]


@pytest.mark.parametrize("world", [2, 4])
def test_dp_layouts_match_single_process(reference, world):
    results = run_distributed(_all_configs, world, world=world)
    for rank_results in results:
        _check_against_reference(rank_results, reference, dp=world)


def test_single_process_memory_table(reference):
    """One process: the memory table, and at DP = 1 the distributed optimizer and overlapped reduction
    are the plain optimizer (one shard, nothing to overlap), so their fp32 parameters equal it bit for bit."""
    for name, kwargs in CONFIGS:
        _check_memory_table(name, kwargs, reference[name], dp=1)
        _check_twins(name, kwargs, reference[name], reference, dp=1)
        split_offload = kwargs.get("nvme") or (kwargs.get("offload") not in (None, 1.0))
        if name.startswith("fp32_") and kwargs.get("optimizer", "adam") == "adam" and not split_offload:
            for key, value in reference["fp32"]["params"].items():
                assert torch.equal(reference[name]["params"][key], value), (name, key)
            # the norm is summed over the optimizer's own parameter grouping: the same up to float64 rounding
            assert reference[name]["norms"] == pytest.approx(reference["fp32"]["norms"], rel=1e-12), name


def _fp16_overflow(world: int) -> list:
    parallel_state.initialize_model_parallel()
    out = []
    for dist_opt in (False, True):
        cfg = make_config(world, precision="fp16", dist_opt=dist_opt, initial_loss_scale=2.0 ** 10, hysteresis=1,
                          loss_scale_window=2)
        result = train(cfg, steps=4, inject_inf_at=1)
        out.append({k: result[k] for k in ("ok", "scales", "params_per_step")})
    # A second backward after the overlapped reduction started is refused, not silently mis-reduced.
    cfg = make_config(world, overlap=True)
    ddp = DistributedDataParallel(cfg, ToyModel(), groups=parallel_state.get_process_groups())
    x = torch.randn(2, HIDDEN)
    ddp(x).sum().backward()
    try:
        ddp(x).sum().backward()
        out.append("no error")
    except RuntimeError as error:
        out.append(str(error))
    ddp.finish_grad_sync()
    return out


def test_fp16_overflow_skips_on_all_ranks_and_rescales():
    for rank_result in run_distributed(_fp16_overflow, 2, world=2):
        assert "no_sync" in rank_result.pop()
        for r in rank_result:
            assert r["ok"] == [True, False, True, True]
            # halved on the overflow; window 2: two clean steps later it doubles back
            assert r["scales"] == [2.0 ** 10, 2.0 ** 9, 2.0 ** 9, 2.0 ** 10]
            before, skipped = r["params_per_step"][0], r["params_per_step"][1]
            for key in before:
                assert torch.equal(before[key], skipped[key]), f"skipped step changed {key}"


# The ZeRO paper's Adam table (K = 12, 16-bit gradients: fp16 without --accumulate-allreduce-grads-in-fp32)
# next to Megatron's fp32 gradient buffer (bf16) and fp32 training; optimizer/memory.py states all three.
PAPER_TABLE = {  # (precision, strategy) -> bytes/param as a function of d
    ("fp16", "no_shard"): lambda d: 16, ("fp16", "optim"): lambda d: 4 + 12 / d, ("fp16", "optim_grads"): lambda d: 2 + 14 / d,
    ("bf16", "no_shard"): lambda d: 18, ("bf16", "optim"): lambda d: 6 + 12 / d, ("bf16", "optim_grads"): lambda d: 2 + 16 / d,
    ("fp32", "no_shard"): lambda d: 16, ("fp32", "optim"): lambda d: 8 + 8 / d, ("fp32", "optim_grads"): lambda d: 4 + 12 / d,
    ("fp16", "optim_grads_params"): lambda d: 16 / d, ("bf16", "optim_grads_params"): lambda d: 18 / d,
    ("fp32", "optim_grads_params"): lambda d: 16 / d,
}


def _memory_table(world: int) -> dict:
    parallel_state.initialize_model_parallel()
    out = {}
    for precision, strategy in PAPER_TABLE:
        cfg = make_config(world, precision=precision, strategy=strategy)
        torch.manual_seed(0)
        ddp = DistributedDataParallel(cfg, ToyModel().to(cfg.params_dtype), groups=parallel_state.get_process_groups())
        out[(precision, strategy)] = memory_report([ddp], get_megatron_optimizer(cfg, [ddp], parallel_state.get_process_groups()))
    return out


def test_memory_table_matches_zero_paper():
    """Bytes/param per rank at start-up, d = 4, within 2% of the tables (bucket padding is the slack)."""
    for rank_result in run_distributed(_memory_table, 4, world=4):
        for key, formula in PAPER_TABLE.items():
            report = rank_result[key]
            assert report["bytes_per_param"] == pytest.approx(formula(4), rel=0.02), (key, report)
            assert report["host"] == report["disk"] == 0 and report["total"] == report["device_total"]
