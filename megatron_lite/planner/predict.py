"""One layout's full prediction (the planner's output record): memory and time, broken down.

Keys (tools/plan_parallel.py's JSON, snake_case, as issue 18 names them): the layout sizes and options,
memory_per_gpu_gb with memory_breakdown_gb (params, grads, main_params, optimizer_states, activations,
other), step_time_s with step_time_breakdown_s (compute, tp_comm, cp_comm, ep_comm, dp_comm_exposed,
pipeline_bubble, and optimizer_step), tflops_per_gpu and mfu (the logs' model FLOPs: logging.py), fits,
flags (the exact pretrain_gpt.py flags), plus schedule, num_microbatches and memory_per_stage_gb.
"""
from __future__ import annotations

import functools

from megatron_lite.planner.activations import ModelShape
from megatron_lite.planner.hardware import Hardware
from megatron_lite.planner.layout import Layout, apply, flags, num_microbatches, prepare
from megatron_lite.planner.memory import GPU_FIXED_BYTES, layout_memory
from megatron_lite.planner.states import _Holder, fast_state_bytes, state_bytes
from megatron_lite.planner.timing import step_time

GB = 1e9
BREAKDOWN = ("params", "grads", "main_params", "optimizer_states", "activations", "other")


def schedule_for(layout: Layout, m: int, requested: str = "auto") -> str:
    """The schedule pretrain_gpt.py would run (pipeline/auto.py's choice for m micro-batches, or the
    --pipeline-schedule `requested`)."""
    return _schedule(layout.pp, layout.vp, m, requested)


@functools.lru_cache(maxsize=4096)
def _schedule(pp: int, vp: int, m: int, requested: str = "auto") -> str:
    from megatron_lite.pipeline.auto import choose_schedule
    from megatron_lite.pipeline.schedules import schedule_name
    from megatron_lite.planner.activations import simulated_microbatches
    if requested != "auto":
        return schedule_name(pp, vp, requested)
    if pp == 1 or vp > 1:
        return choose_schedule(pp, vp, 1 if pp == 1 else pp).name  # no choice to make: the name only
    # auto's bubble comparison does not change past a few x PP micro-batches: decide there
    return choose_schedule(pp, vp, simulated_microbatches(pp, m)).name


@functools.lru_cache(maxsize=1024)
def _flops(holder, tp: int) -> float:
    """logging.num_floating_point_operations of one global batch (depends on the layout only through the
    vocabulary padding to a multiple of TP)."""
    from megatron_lite.logging import num_floating_point_operations
    return num_floating_point_operations(apply(holder.cfg, Layout(tp=tp)), holder.cfg.training.global_batch_size)


def evaluate(cfg, layout: Layout, hw: Hardware, gpus_per_node: int, overlap: bool = True, fast: bool = False) -> dict:
    """The prediction for `layout` of the user's model `cfg` on `hw` (`fast`: the search's state bytes,
    states.fast_state_bytes, instead of the exact meta build)."""
    cfg = prepare(cfg)
    shape = ModelShape.of(cfg, layout.tp)
    m = num_microbatches(cfg, layout)
    schedule = schedule_for(layout, m)
    fixed = 0.0 if hw.compute_units_per_node else GPU_FIXED_BYTES
    worst, stages = layout_memory(cfg, shape, layout, schedule, m, fixed, fast_state_bytes if fast else state_bytes)
    times = step_time(shape, layout, hw, gpus_per_node, schedule, m,
                      [(s["pp_rank"], s["num_params"], s["num_buckets"]) for s in stages], overlap)
    flops = _flops(_Holder(cfg), layout.tp)
    tflops = flops / times["total"] / layout.world / 1e12
    return {
        "tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
        "virtual_pipeline_model_parallel_size": layout.vp if layout.vp > 1 else None,
        "data_parallel_size": layout.dp, "context_parallel_size": layout.cp,
        "expert_model_parallel_size": layout.ep, "sequence_parallel": layout.sp,
        "micro_batch_size": layout.mbs, "recompute_granularity": layout.recompute,
        "data_parallel_sharding_strategy": layout.strategy,
        "memory_per_gpu_gb": worst["total"] / GB,
        "memory_breakdown_gb": {k: worst[k] / GB for k in BREAKDOWN},
        "memory_per_stage_gb": [{"pp_rank": s["pp_rank"], **{k: s[k] / GB for k in (*BREAKDOWN, "total")}} for s in stages],
        "step_time_s": times["total"],
        "step_time_breakdown_s": {k: v for k, v in times.items() if k != "total"},
        "tflops_per_gpu": tflops, "mfu": tflops / hw.peak_tflops,
        "fits": worst["total"] <= hw.memory_gb * GB,
        "flags": flags(cfg, layout, overlap),
        "schedule": schedule, "num_microbatches": m, "hardware": hw.name,
    }
