"""Memory per GPU of one layout: state bytes (states.py), activations (activations.py) and an allowance.

  memory(stage) = params + grads + main_params + optimizer_states     (optimizer.memory.memory_report of
                                                                       the stage's rank, built on meta)
                + activations(stage)                                 (Korthikanti terms x the schedule's
                                                                       peak in flight on that stage)
                + other
  other = the fixed allowance of the hardware (CUDA context, cuBLAS workspace and NCCL buffers: 1 GB on
          a GPU preset, 0 on cpu) + 5% of the above (caching-allocator fragmentation; the PyTorch
          memory notes put typical fragmentation at a few percent with expandable segments off)
          + ZeRO-2/3's transient full gradient bucket (memory_report's grads_peak - grads)
          + ZeRO-3's gathered units: at most two full units at once (distributed/zero3.py), each bounded
          by the stage's largest bucket (zero3_gathered_bytes; checked against the live full-size
          storages measured in a run by test_planner_memory).
memory_per_gpu is the largest stage's (the first stage holds the embedding and the most micro-batches in
flight, the last the output layer).
"""
from __future__ import annotations

from megatron_lite.planner.activations import ModelShape, activation_bytes
from megatron_lite.planner.layout import Layout
from megatron_lite.planner.states import STATE_KEYS, dp_ranks, fast_state_bytes, stage_ranks, state_bytes

FRAGMENTATION = 0.05
GPU_FIXED_BYTES = 1e9


def stage_memory(cfg, shape: ModelShape, layout: Layout, schedule: str, num_microbatches: int, pp_rank: int,
                 fixed_bytes: float, states=state_bytes) -> dict:
    """Bytes by kind on the worst DP rank of pipeline rank `pp_rank` (`states`: state_bytes, or the
    search's fast_state_bytes)."""
    worst = None
    for dp_rank in dp_ranks(layout):
        report = states(cfg, layout, pp_rank, dp_rank)
        if worst is None or report["device_total"] > worst["device_total"]:
            worst = report
    out = {key: float(worst[key]) for key in STATE_KEYS}
    out["activations"] = activation_bytes(shape, layout, schedule, num_microbatches, pp_rank)
    subtotal = sum(out.values())
    out["other"] = fixed_bytes + FRAGMENTATION * subtotal + float(worst["grads_peak"] - worst["grads"])
    if layout.strategy == "optim_grads_params":
        out["other"] += zero3_gathered_bytes(worst)
    out["total"] = subtotal + out["other"]
    out["num_params"] = worst["num_params"]
    out["num_buckets"] = worst["num_buckets"]
    return out


def zero3_gathered_bytes(report: dict) -> float:
    """ZeRO-3's full parameters gathered during a step: at most MAX_GATHERED units at once
    (distributed/zero3.py), each one DDP bucket; bounded by the largest."""
    from megatron_lite.distributed.zero3 import MAX_GATHERED
    return float(MAX_GATHERED * report["largest_bucket_bytes"])


def layout_memory(cfg, shape: ModelShape, layout: Layout, schedule: str, num_microbatches: int,
                  fixed_bytes: float, states=state_bytes) -> tuple[dict, list[dict]]:
    """(the worst stage's breakdown, every distinct stage's) in bytes."""
    stages = [dict(stage_memory(cfg, shape, layout, schedule, num_microbatches, r, fixed_bytes, states), pp_rank=r)
              for r in sorted(set(stage_ranks(layout)) | ({0} if layout.vp > 1 else set()))]
    return max(stages, key=lambda s: s["total"]), stages


def lower_bound_bytes(cfg, shape: ModelShape, layout: Layout) -> float:
    """A cheap lower bound for pruning before the schedule is simulated: stage 0's state bytes plus one
    micro-batch of its activations."""
    from megatron_lite.planner.activations import chunk_bytes
    report = fast_state_bytes(cfg, layout, 0, 0)
    return float(report["device_total"]) + max(chunk_bytes(shape, layout, 0))
