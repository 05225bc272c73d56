"""The search: every valid factorisation of the GPUs and every option, memory first, then time.

Candidates (N GPUs, G per node): TP dividing G (a TP group stays inside a node, as every Megatron recipe
has it) and the heads and query groups; CP dividing the rest with seq divisible by 2 CP (and, as a
pruning rule, only when each CP rank keeps >= 1,024 tokens, unless the sequence is short enough that CP
1 is the only choice); PP dividing the layers; VP (interleaving) with layers divisible by PP x VP, VP in
1, 2, 4; DP = N / (TP CP PP), with the global batch divisible by DP x micro-batch; EP dividing the experts
and DP x CP (MoE models only); micro-batch 1, 2, 4, 8; SP whenever TP > 1 (SP has the same communication
volume and strictly less activation memory, so SP off is dominated); every DP sharding strategy; and
recompute none, selective, full -- tried in that order, stopping at the first that fits (each is slower
and smaller than the one before, so the others are dominated).
Pruning: a candidate whose stage-0 state bytes plus one micro-batch of activations already exceed the
device is dropped before its schedule is simulated; the rest are predicted in full (predict.evaluate).
Ranking: predicted step time (ties: less memory). Plans are checked with config.validate() before they
are returned, so every plan is one pretrain_gpt.py accepts (except what validate_implemented still
refuses on this build, reported in `implemented`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lite.errors import ConfigError
from megatron_lite.planner.activations import ModelShape
from megatron_lite.planner.hardware import Hardware
from megatron_lite.planner.layout import RECOMPUTE, STRATEGIES, Layout, apply, prepare
from megatron_lite.planner.memory import GPU_FIXED_BYTES, lower_bound_bytes
from megatron_lite.planner.predict import GB, evaluate

MICRO_BATCHES = (1, 2, 4, 8)
VIRTUAL = (1, 2, 4)
MIN_CP_TOKENS = 1024


@dataclass
class SearchResult:
    plans: list
    considered: int = 0
    pruned_by_memory: int = 0
    smallest: dict = field(default_factory=dict)  # the least memory any candidate needs, and its layout
    refused: str = ""  # the first config.validate() error of a plan that fit (when every one was refused)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def structures(cfg, num_gpus: int, gpus_per_node: int):
    """(tp, cp, pp, vp, dp, ep) tuples that divide the GPUs and the model."""
    m = cfg.model
    heads, groups, seq, layers = m.num_attention_heads, m.num_query_groups or m.num_attention_heads, m.seq_length, m.num_layers
    experts = cfg.moe.num_experts or 0
    for tp in _divisors(num_gpus):
        if tp > gpus_per_node or gpus_per_node % tp or heads % tp or groups % tp:
            continue
        for cp in _divisors(num_gpus // tp):
            if cp > 1 and (seq % (2 * cp * tp) or seq // cp < min(MIN_CP_TOKENS, seq)):
                continue
            for pp in _divisors(num_gpus // (tp * cp)):
                if layers % pp:
                    continue
                dp = num_gpus // (tp * cp * pp)
                for vp in VIRTUAL:
                    if vp > 1 and (pp == 1 or layers % (pp * vp)):
                        continue
                    for ep in ([1] if not experts else [e for e in _divisors(experts) if (dp * cp) % e == 0]):
                        yield tp, cp, pp, vp, dp, ep


def candidates(cfg, num_gpus: int, gpus_per_node: int, constraint=None):
    gbs = cfg.training.global_batch_size
    for tp, cp, pp, vp, dp, ep in structures(cfg, num_gpus, gpus_per_node):
        for mbs in MICRO_BATCHES:
            if gbs % (mbs * dp):
                continue
            m = gbs // (mbs * dp)
            if vp > 1 and m % pp:
                continue  # interleaving's micro-batch groups (pipeline/schedules.check_interleaving)
            for strategy in (STRATEGIES if dp * cp > 1 else ("no_shard",)):
                for sp in ((True, False) if constraint is not None and tp > 1 else (tp > 1,)):
                    options = [Layout(tp, pp, vp, dp, cp, ep, sp, mbs, r, strategy) for r in RECOMPUTE]
                    options = [o for o in options if constraint is None or constraint(o)]
                    if options:
                        yield options


def search(cfg, num_gpus: int, gpus_per_node: int, hw: Hardware, top: int = 5, constraint=None,
           implemented_only: bool = False) -> SearchResult:
    """The `top` fastest layouts that fit (`constraint(layout)`: only layouts it accepts, e.g. the user's
    explicit flags; `implemented_only`: only what this build runs)."""
    if num_gpus < 1 or gpus_per_node < 1:
        raise ConfigError("--num-gpus/--gpus-per-node: must be >= 1.")
    if num_gpus > gpus_per_node and num_gpus % gpus_per_node:
        raise ConfigError(f"--num-gpus {num_gpus} is not a multiple of --gpus-per-node {gpus_per_node}: nodes would "
                          f"be partly used. Use a multiple of {gpus_per_node}, or fewer GPUs per node.")
    cfg = prepare(cfg)
    limit = hw.memory_gb * GB
    fixed = 0.0 if hw.compute_units_per_node else GPU_FIXED_BYTES
    result = SearchResult(plans=[])
    for options in candidates(cfg, num_gpus, gpus_per_node, constraint):
        for layout in options:  # recompute none, selective, full: the first that fits dominates the rest
            result.considered += 1
            shape = ModelShape.of(cfg, layout.tp)
            bound = lower_bound_bytes(cfg, shape, layout) + fixed
            if bound > limit:
                result.pruned_by_memory += 1
                _note_smallest(result, bound, layout)
                continue
            plan = evaluate(cfg, layout, hw, gpus_per_node, fast=True)
            if plan["fits"]:
                result.plans.append(plan)
                break
            _note_smallest(result, plan["memory_per_gpu_gb"] * GB, layout)
    result.plans.sort(key=lambda p: (p["step_time_s"], p["memory_per_gpu_gb"]))
    # the leaders again with the exact state bytes (the meta build + memory_report), then ranked
    from megatron_lite.planner.layout import layout_from_plan
    errors: list = []
    exact = [dict(evaluate(cfg, layout_from_plan(p), hw, gpus_per_node), implemented=p["implemented"])
             for p in _valid(cfg, result.plans, 2 * top, implemented_only, errors)]
    result.refused = errors[0] if errors and not exact else ""
    exact.sort(key=lambda p: (not p["fits"], p["step_time_s"], p["memory_per_gpu_gb"]))
    result.plans = [p for p in exact if p["fits"]][:top]
    return result


def _note_smallest(result: SearchResult, nbytes: float, layout: Layout) -> None:
    if not result.smallest or nbytes < result.smallest["bytes"]:
        result.smallest = {"bytes": nbytes, "layout": layout}


def _valid(cfg, plans: list, top: int, implemented_only: bool = False, errors: list = None) -> list:
    """The first `top` plans that config.validate() accepts; `implemented` says whether this build runs it."""
    out = []
    for plan in plans:
        if _accepted(cfg, plan, errors) and (plan["implemented"] or not implemented_only):
            out.append(plan)
        if len(out) >= top:
            break
    return out


def _accepted(cfg, plan: dict, errors: list = None) -> bool:
    """config.validate() accepts the plan (what is refused only as not implemented yet on this build is
    kept, marked implemented = False)."""
    from megatron_lite.planner.layout import layout_from_plan
    config = apply(cfg, layout_from_plan(plan))
    try:
        config.validate()
        plan["implemented"] = True
    except ConfigError as error:
        if errors is not None:
            errors.append(str(error))
        if "not implemented" not in str(error):
            return False
        plan["implemented"] = False
    return True


def fits_nowhere_message(result: SearchResult, hw: Hardware, num_gpus: int) -> str:
    from megatron_lite.planner.layout import describe
    smallest = result.smallest
    if result.refused:
        return f"every layout that fits was refused by the configuration's rules; the first: {result.refused}"
    if not smallest:
        return (f"no valid layout: {num_gpus} GPUs admit no factorisation of this model (check that the heads, "
                "layers and global batch divide).")
    layout = smallest["layout"]
    return (f"the model fits on no layout of {num_gpus} x {hw.name} ({hw.memory_gb:g} GB each): the smallest "
            f"memory any layout needs is {smallest['bytes'] / GB:.1f} GB per GPU, with {describe(layout)}, "
            f"--data-parallel-sharding-strategy {layout.strategy}, --recompute-granularity {layout.recompute}, "
            f"--micro-batch-size {layout.mbs}. Use GPUs with at least that much memory (--gpu-memory-gb), more "
            "GPUs, or a smaller model / sequence.")
