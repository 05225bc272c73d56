"""pretrain_gpt.py --auto-parallel: plan the layout for the launched world size, then train with it.

Runs in arguments.parse, before validation and before any process group exists, on every rank: the
planner is deterministic, so every rank picks the same plan. Layout flags the user gave (on the command
line or in --config) win: the search keeps them fixed and plans the rest. The hardware is the preset of
the visible GPU (hardware.detect), or on CPU the cached calibration (hardware.CPU_PROFILE_CACHE, written by
`tools/plan_parallel.py --hardware cpu`) or, without one, CPU_FALLBACK -- never a fresh measurement, which
would differ between ranks. Only plans this build implements are chosen.
"""
from __future__ import annotations

import os
import sys

from megatron_lite.errors import ConfigError
from megatron_lite.planner.hardware import CPU_PROFILE_CACHE, Hardware, detect, get_hardware
from megatron_lite.planner.layout import Layout, apply, layout_from_plan

# field name (config section, field) -> Layout attribute
LAYOUT_FIELDS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                 "num_layers_per_virtual_pipeline_stage": "vp", "virtual_pipeline_model_parallel_size": "vp",
                 "context_parallel_size": "cp", "expert_model_parallel_size": "ep", "sequence_parallel": "sp",
                 "micro_batch_size": "mbs", "recompute_granularity": "recompute",
                 "data_parallel_sharding_strategy": "strategy", "use_distributed_optimizer": "strategy"}

# A modest 1-thread CPU (fp32 GEMMs ~20 GFLOP/s, gloo over loopback); used only when no calibration is cached.
CPU_FALLBACK = dict(peak_tflops=0.02, memory_bandwidth_gbps=5.0, intra_node_bandwidth_gbps=1.0,
                    inter_node_bandwidth_gbps=1.0, intra_node_latency_s=50e-6, inter_node_latency_s=50e-6)


def _hardware() -> Hardware:
    name = detect()
    if name != "cpu":
        return get_hardware(name)
    if os.path.exists(CPU_PROFILE_CACHE):
        return get_hardware(profile=CPU_PROFILE_CACHE)
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Hardware("cpu", memory_gb=memory_gb, compute_units_per_node=os.cpu_count(), **CPU_FALLBACK)


def _fixed(cfg, explicit: set) -> dict:
    """Layout attributes the user set explicitly, with their values."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    values = {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
              "cp": p.context_parallel_size, "ep": p.expert_model_parallel_size, "sp": p.sequence_parallel,
              "mbs": t.micro_batch_size, "recompute": m.recompute_granularity or "none",
              "strategy": p.sharding_strategy}
    if p.num_layers_per_virtual_pipeline_stage:
        values["vp"] = m.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)
    else:
        values["vp"] = p.virtual_pipeline_model_parallel_size or 1
    return {LAYOUT_FIELDS[name]: values[LAYOUT_FIELDS[name]] for name in explicit if name in LAYOUT_FIELDS}


def apply_auto_parallel(cfg, explicit: set) -> dict:
    """Set cfg's layout fields to the best plan for cfg.world_size (explicit ones kept); returns the plan."""
    from megatron_lite.planner.report import memory_lines, table
    from megatron_lite.planner.search import fits_nowhere_message, search
    hw = _hardware()
    world = cfg.world_size
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if hw.name != "cpu" else world
    fixed = _fixed(cfg, explicit)
    result = search(cfg, world, gpus_per_node, hw, top=1,
                    constraint=lambda layout: all(getattr(layout, k) == v for k, v in fixed.items()),
                    implemented_only=True)
    if not result.plans:
        raise ConfigError("--auto-parallel: " + fits_nowhere_message(result, hw, world) +
                          (f" (keeping the explicit {fixed})" if fixed else ""))
    plan = result.plans[0]
    planned = apply(cfg, layout_from_plan(plan))
    cfg.parallel, cfg.training.micro_batch_size = planned.parallel, planned.training.micro_batch_size
    m = cfg.model
    m.recompute_granularity, m.recompute_method, m.recompute_num_layers = (
        planned.model.recompute_granularity, planned.model.recompute_method, planned.model.recompute_num_layers)
    if os.environ.get("RANK", "0") == "0":
        print(f"auto-parallel: {world} x {hw.name}; kept {fixed or 'nothing'} fixed; chosen plan:\n"
              f"{table([plan])}\n{memory_lines(plan)}\nauto-parallel flags: {' '.join(plan['flags'])}",
              file=sys.stdout, flush=True)
    cfg.extra["auto_parallel_plan"] = plan
    return plan


__all__ = ["LAYOUT_FIELDS", "Layout", "apply_auto_parallel"]
