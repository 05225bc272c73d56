"""Parameters, gradients, fp32 main parameters and optimizer states per rank: the optimizer's own accounting.

Rather than a second copy of the bytes-per-parameter rules (optimizer/memory.py's table: 18 bytes/param
for bf16 no_shard, 6 + 12/d for ZeRO-1, 2 + 16/d for ZeRO-2, 18/d for ZeRO-3, plus the DDP buffers'
padding to a multiple of DP per bucket and the tied embedding's own bucket), the planner builds the rank's
real model chunks on PyTorch's meta device (shapes, no storage), wraps them in the real
DistributedDataParallel and MegatronOptimizer with shape-only process groups, and asks
`optimizer.memory.memory_report` -- the very function the training run logs at start-up. So a prediction
equals what a run reports, byte for byte, by construction, and every future change to the accounting
(ZeRO-3, offload, MoE experts) is picked up without touching the planner.

Cost: one meta build per (layout sizes, strategy, pipeline stage) -- cached -- a few milliseconds per
transformer layer held by the stage.
"""
from __future__ import annotations

import copy
import functools
from typing import Optional

from megatron_lite.planner.layout import Layout, apply
from megatron_lite.process_groups import GROUP_FIELDS, Group, ProcessGroups

STATE_KEYS = ("params", "grads", "main_params", "optimizer_states")


def shape_groups(layout: Layout, tp_rank: int = 0, pp_rank: int = 0, dp_rank: int = 0, cp_rank: int = 0) -> ProcessGroups:
    """ProcessGroups of one rank with the right sizes and positions and no communicator (nothing is sent).
    Ranks inside each group are numbered 0..size-1: only sizes and this rank's index matter here."""
    sizes = {"world": layout.world, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "cp": layout.cp,
             "dp_cp": layout.dp * layout.cp, "mp": layout.tp * layout.pp, "tp_cp": layout.tp * layout.cp,
             "tp_dp": layout.tp * layout.dp, "tp_dp_cp": layout.tp * layout.dp * layout.cp, "ep": layout.ep,
             # experts: expert TP = TP (megatron-core's default), folded as ETP x EP x EDP x PP
             "expert_dp": max(1, layout.dp * layout.cp // layout.ep), "tp_ep": layout.tp * layout.ep,
             "etp": layout.tp, "tp_ep_pp": layout.tp * layout.ep * layout.pp}
    index = {"tp": tp_rank, "pp": pp_rank, "dp": dp_rank, "cp": cp_rank, "dp_cp": dp_rank * layout.cp + cp_rank}
    groups = {name: Group(name, tuple(range(sizes[name])), index.get(name, 0)) for name in GROUP_FIELDS}
    first_or_last = pp_rank in (0, layout.pp - 1)
    embd = Group("embd", tuple(range(min(2, layout.pp))), 0 if pp_rank == 0 else min(1, layout.pp - 1)) if first_or_last else None
    return ProcessGroups(**groups, embd=embd, vp_size=layout.vp if layout.vp > 1 else None)


def rank_state_bytes(cfg, layout: Layout, pp_rank: int = 0, dp_rank: int = 0, tp_rank: int = 0, cp_rank: int = 0) -> dict:
    """optimizer.memory.memory_report of the rank at (pp_rank, dp_rank, tp_rank, cp_rank) under `layout`,
    computed on the meta device. `cfg` is the user's (model, precision, optimizer) Config."""
    import torch  # noqa: F401  (kept local: importing the planner's search stays cheap)
    from megatron_lite.distributed.ddp import DistributedDataParallel
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.optimizer import get_megatron_optimizer
    from megatron_lite.optimizer.memory import memory_report
    from megatron_lite.pipeline.stages import build_model_chunks

    config = apply(cfg, layout)
    config.model.derive_defaults()
    config.moe.derive_defaults(config)
    config.parallel.derive_defaults()
    groups = shape_groups(layout, tp_rank, pp_rank, dp_rank, cp_rank)

    def provider(pre: bool, post: bool, layers: list[int]):
        return GPTModel(config, pre_process=pre, post_process=post, layer_numbers=layers, device="meta", groups=groups)

    chunks = build_model_chunks(config, provider, groups)
    model = [DistributedDataParallel(config, chunk, groups=groups) for chunk in chunks]
    optimizer = get_megatron_optimizer(config, model, groups)
    report = memory_report(model, optimizer)
    # the DDP buckets: one gradient collective each (timing.dp_comm pays a collective's latency per bucket)
    report["num_buckets"] = sum(len(buffer.buckets) for chunk in model for buffer in chunk._buffers)
    # ZeRO-3 gathers a unit (one bucket) at a time into full parameters: the largest unit's bytes
    report["largest_bucket_bytes"] = max((bucket.numel * buffer.param_dtype.itemsize for chunk in model
                                          for buffer in chunk._buffers for bucket in buffer.buckets), default=0)
    optimizer.close()
    return report


def _key(cfg) -> str:
    """What of the user's Config changes state bytes (everything but the layout fields, which `apply` sets)."""
    return repr((cfg.model, cfg.moe, cfg.optimizer, cfg.parallel.ddp_bucket_size,
                 cfg.parallel.accumulate_allreduce_grads_in_fp32, cfg.training.global_batch_size))


@functools.lru_cache(maxsize=4096)
def _cached(key: str, cfg_holder, layout: Layout, pp_rank: int, dp_rank: int) -> dict:
    return rank_state_bytes(cfg_holder.cfg, layout, pp_rank, dp_rank)


class _Holder:
    """Hashable by the config's state key, so lru_cache shares results between equal configs."""

    def __init__(self, cfg):
        self.cfg, self.key = cfg, _key(cfg)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Holder) and other.key == self.key


EXACT_LAYERS = 8  # stages with more layers per rank are extrapolated (see state_bytes)


def state_bytes(cfg, layout: Layout, pp_rank: int, dp_rank: int = 0) -> dict:
    """Cached rank_state_bytes; micro-batch size, recompute and SP do not change state bytes, so they are
    normalised out of the cache key. A rank holding more than EXACT_LAYERS layers is built with k = 1 and
    2 layers per virtual stage and extrapolated linearly in k (every layer is the same module, so only
    the DDP buckets' padding -- under DP elements per 40M-element bucket -- can differ from the real
    build); smaller stages, including every layout the tests run, are built exactly."""
    from dataclasses import replace
    plain = replace(layout, mbs=1, recompute="none", sp=False)
    holder = _Holder(cfg)
    layers_per_rank = cfg.model.num_layers // layout.pp
    if layers_per_rank <= EXACT_LAYERS or cfg.model.num_layers % (layout.pp * layout.vp):
        return _cached(holder.key, holder, plain, pp_rank, dp_rank)
    k = cfg.model.num_layers // (layout.pp * layout.vp)
    reports = []
    for small in (1, 2):
        cfg_small = copy.deepcopy(cfg)
        cfg_small.model.num_layers = layout.pp * layout.vp * small
        small_holder = _Holder(cfg_small)
        reports.append(_cached(small_holder.key, small_holder, plain, pp_rank, dp_rank))
    one, two = reports
    out = {key: (one[key] + (k - 1) * (two[key] - one[key])) for key in one if isinstance(one[key], (int, float))}
    for key in ("params", "grads", "main_params", "optimizer_states", "host", "disk", "grads_peak",
                "device_total", "total", "num_params", "num_buckets", "largest_bucket_bytes"):
        out[key] = int(round(out[key]))
    return out


def stage_ranks(layout: Layout) -> list[int]:
    """Pipeline ranks whose state bytes can differ: the first, the last, and one middle stage."""
    return sorted({0, layout.pp - 1, *( [1] if layout.pp > 2 else [])})


def dp_ranks(layout: Layout) -> list[int]:
    """DP ranks whose shards can differ in real elements: the first and the last (padding sits at the end)."""
    return sorted({0, layout.dp * layout.cp - 1}) if layout.strategy != "no_shard" else [0]


def worst_rank_state(cfg, layout: Layout, pp_rank: Optional[int] = None) -> dict:
    """Per stage (or for one stage) the largest device state bytes over the DP ranks that can differ."""
    best = None
    for rank in ([pp_rank] if pp_rank is not None else stage_ranks(layout)):
        for dp_rank in dp_ranks(layout):
            report = state_bytes(cfg, layout, rank, dp_rank)
            if best is None or report["device_total"] > best["device_total"]:
                best = report
    return best


# ---- the search's fast path ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=8192)
def _stage_param_count(holder, tp: int, pp: int, vp: int, pp_rank: int, layers_per_chunk: int) -> int:
    """Parameters of pipeline rank pp_rank's chunks with `layers_per_chunk` layers each (meta build)."""
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.pipeline.stages import build_model_chunks
    config = copy.deepcopy(holder.cfg)
    config.model.num_layers = pp * vp * layers_per_chunk
    layout = Layout(tp=tp, pp=pp, vp=vp)
    config = apply(config, layout)
    groups = shape_groups(layout, 0, pp_rank, 0)

    def provider(pre: bool, post: bool, layers: list[int]):
        return GPTModel(config, pre_process=pre, post_process=post, layer_numbers=layers, device="meta", groups=groups)
    return sum(p.numel() for chunk in build_model_chunks(config, provider, groups) for p in chunk.parameters())


@functools.lru_cache(maxsize=1024)
def _rates(holder, strategy: str, dp: int, cp: int, ep: int) -> dict:
    """Bytes per local parameter by kind, from memory_report of a one-layer TP 1 PP 1 rank of the same model,
    precision and optimizer under this strategy and DP x CP (the last DP rank: the one padding shortens
    least... the first holds the most, we take the larger of the two)."""
    config = copy.deepcopy(holder.cfg)
    config.model.num_layers = 1
    layout = Layout(dp=dp, cp=cp, ep=ep, strategy=strategy)
    reports = [rank_state_bytes(config, layout, 0, r) for r in dp_ranks(layout)]
    report = max(reports, key=lambda r: r["device_total"])
    n = max(1, report["num_params"])
    return {key: report[key] / n for key in (*STATE_KEYS, "grads_peak", "host", "disk")}


def fast_state_bytes(cfg, layout: Layout, pp_rank: int, dp_rank: int = 0) -> dict:
    """state_bytes for the search: the stage's parameter count (meta-built model, extrapolated in layers)
    times the bytes per parameter memory_report gives this strategy and DP size. Agrees with state_bytes
    up to the DDP buckets' padding; returned plans are re-predicted with state_bytes."""
    del dp_rank
    holder = _Holder(cfg)
    k = cfg.model.num_layers // (layout.pp * layout.vp)
    one = _stage_param_count(holder, layout.tp, layout.pp, layout.vp, pp_rank, 1)
    count = one if k == 1 else one + (k - 1) * (_stage_param_count(holder, layout.tp, layout.pp, layout.vp, pp_rank, 2) - one)
    rates = _rates(holder, layout.strategy, layout.dp, layout.cp, layout.ep)
    out = {key: rate * count for key, rate in rates.items()}
    out["device_total"] = sum(out[key] for key in STATE_KEYS)
    out["total"] = out["device_total"] + out["host"] + out["disk"]
    out["num_params"] = count
    # buckets close at parameter boundaries once they reach the bucket size: at least this many
    from megatron_lite.distributed.ddp import default_bucket_size
    bucket = cfg.parallel.ddp_bucket_size or default_bucket_size(layout.dp * layout.cp)
    out["num_buckets"] = max(layout.vp, -(-count // bucket))
    # ZeRO-3's largest unit: at most a one-layer chunk with the embedding (an upper bound for the search)
    out["largest_bucket_bytes"] = one * (2 if cfg.optimizer.bf16 or cfg.optimizer.fp16 else 4)
    return out
