"""The pipeline layout rules, in one place: which layers each (virtual) stage holds, and what is valid.

Configuration validation (config.py), stage assignment (stages.py), the offline checkpoint writer and
inference all ask this module; nothing else re-checks these rules.
- Layers are split evenly over PP stages, except that --decoder-first/last-pipeline-num-layers fix the
  count on the first/last stage and the rest is split evenly over the middle stages.
- With virtual stages (interleaved 1F1B) each rank holds VP chunks of --num-layers-per-virtual-pipeline-stage
  layers; chunk v on rank r is virtual stage v x PP + r. --num-virtual-stages-per-pipeline-rank is the
  other way to say the same thing. ZB-V (--pipeline-schedule zbv, VP = 2) places them as a V instead:
  chunk 0 on rank r is stage r, chunk 1 is stage 2 PP - 1 - r (is_v_shape).
- The schedule's own rule (interleaving needs at least --microbatch-group-size-per-virtual-pipeline-stage
  micro-batches, default PP) is owned by schedules.check_interleaving, which validation calls.
"""
from __future__ import annotations

from typing import Optional

from megatron_lite.errors import ConfigError, fail


def stage_layer_counts(num_layers: int, pp_size: int, first_stage_layers: Optional[int] = None,
                       last_stage_layers: Optional[int] = None) -> list[int]:
    """Number of layers on each pipeline stage (no virtual stages)."""
    if pp_size == 1:
        return [num_layers]
    first, last = first_stage_layers, last_stage_layers
    middle_stages = pp_size - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        fail("--decoder-first/last-pipeline-num-layers", f"do not add up to --num-layers {num_layers} over {pp_size} stages",
             "Make first + last + (an even share per middle stage) equal --num-layers.")
    if middle_stages and middle_layers % middle_stages:
        fail("--num-layers", f"the {middle_layers} layers left for {middle_stages} pipeline stage(s) do not divide evenly "
             f"(first={first}, last={last})",
             f"Use --num-layers such that the remaining layers are a multiple of {middle_stages}, or change "
             "--decoder-first/last-pipeline-num-layers.")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def check_virtual_stages(num_layers: int, pp_size: int, vp_size: Optional[int], uneven: bool = False) -> None:
    """Virtual stages need PP > 1, even stages, and layers that split over PP x VP."""
    if vp_size is None or vp_size <= 1:
        return
    if pp_size == 1:
        fail("--num-layers-per-virtual-pipeline-stage", "needs --pipeline-model-parallel-size > 1",
             "Drop it, or use PP >= 2 (interleaving needs several stages).")
    if uneven:
        fail("--num-layers-per-virtual-pipeline-stage", "cannot be combined with uneven first/last stages here",
             "Drop --decoder-first/last-pipeline-num-layers.")
    if num_layers % (pp_size * vp_size) != 0:
        fail("--num-layers", f"{num_layers} layers are not divisible by PP x VP = {pp_size} x {vp_size}",
             f"Use a multiple of {pp_size * vp_size}.")


def layers_for_stage(num_layers: int, pp_size: int, pp_rank: int, vp_size: Optional[int] = None, vp_rank: int = 0,
                     first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None,
                     v_shape: bool = False) -> list[int]:
    """Global layer numbers held by pipeline rank `pp_rank` (model chunk `vp_rank` with virtual stages;
    v_shape: ZB-V's placement, actions.virtual_stage). Raises ConfigError for a layout that does not divide."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside [0, {pp_size})")
    if vp_size is not None and vp_size > 1:
        check_virtual_stages(num_layers, pp_size, vp_size, first_stage_layers is not None or last_stage_layers is not None)
        if not 0 <= vp_rank < vp_size:
            raise ValueError(f"vp_rank {vp_rank} is outside [0, {vp_size})")
        per_virtual_stage = num_layers // (pp_size * vp_size)
        from megatron_lite.pipeline.actions import virtual_stage
        start = virtual_stage(pp_size, pp_rank, vp_rank, v_shape and vp_size == 2) * per_virtual_stage
        return list(range(start, start + per_virtual_stage))
    counts = stage_layer_counts(num_layers, pp_size, first_stage_layers, last_stage_layers)
    start = sum(counts[:pp_rank])
    return list(range(start, start + counts[pp_rank]))


def is_v_shape(cfg) -> bool:
    """Whether this configuration runs ZB-V and so places its two chunks per rank as a V."""
    p = cfg.parallel
    if (p.virtual_pipeline_model_parallel_size or 1) != 2 or p.pipeline_model_parallel_size < 2:
        return False
    if p.pipeline_schedule == "zbv":
        return True
    if p.pipeline_schedule != "auto":
        return False
    from megatron_lite.pipeline.auto import resolve
    return resolve(cfg).name == "zbv"


# ---- configuration ------------------------------------------------------------------------------
def derive_virtual_stages(cfg) -> list[str]:
    """Fill --num-virtual-stages-per-pipeline-rank from --num-layers-per-virtual-pipeline-stage or the other
    way round. Returns notes on values changed (VP = 1 means no virtual stages)."""
    p, m = cfg.parallel, cfg.model
    pp = p.pipeline_model_parallel_size
    per_stage = m.num_layers // pp if pp >= 1 else 0
    per_virtual = p.num_layers_per_virtual_pipeline_stage
    if per_virtual and pp > 1 and per_stage % per_virtual == 0 and p.virtual_pipeline_model_parallel_size is None:
        p.virtual_pipeline_model_parallel_size = per_stage // per_virtual
    elif per_virtual is None and p.virtual_pipeline_model_parallel_size and pp > 1 \
            and m.num_layers % (pp * p.virtual_pipeline_model_parallel_size) == 0:
        p.num_layers_per_virtual_pipeline_stage = m.num_layers // (pp * p.virtual_pipeline_model_parallel_size)
    if p.virtual_pipeline_model_parallel_size == 1:
        p.virtual_pipeline_model_parallel_size = p.num_layers_per_virtual_pipeline_stage = None
        return ["one virtual stage per pipeline rank is no interleaving: running without virtual stages"]
    return []


def validate_layout(cfg) -> None:
    """Every pipeline layout rule of a configuration (after derive_virtual_stages)."""
    m, p = cfg.model, cfg.parallel
    pp = p.pipeline_model_parallel_size
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    if (first is not None or last is not None) and pp == 1:
        fail("--decoder-first-pipeline-num-layers", "needs --pipeline-model-parallel-size > 1", "Drop it, or use PP > 1.")
    if first is None and last is None and m.num_layers % pp != 0:
        fail("--num-layers", f"{m.num_layers} layers are not divisible by --pipeline-model-parallel-size {pp}",
             f"Use a multiple of {pp}, or set --decoder-first/last-pipeline-num-layers.")
    stage_layer_counts(m.num_layers, pp, first, last)
    _validate_virtual_flags(cfg)
    from megatron_lite.pipeline.schedules import schedule_name
    schedule_name(pp, p.virtual_pipeline_model_parallel_size or 1, p.pipeline_schedule)  # the schedules' own rule


def _validate_virtual_flags(cfg) -> None:
    m, p = cfg.model, cfg.parallel
    pp, per_virtual, vp = p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage, p.virtual_pipeline_model_parallel_size
    uneven = p.decoder_first_pipeline_num_layers is not None or p.decoder_last_pipeline_num_layers is not None
    if per_virtual is not None:
        if pp == 1:
            fail("--num-layers-per-virtual-pipeline-stage", "needs --pipeline-model-parallel-size > 1",
                 "Drop it, or use PP >= 2 (interleaving needs several stages).")
        per_stage = m.num_layers // pp
        if per_virtual < 1:
            fail("--num-layers-per-virtual-pipeline-stage", f"must be at least 1, got {per_virtual}",
                 "Give the layers per virtual stage (a divisor of the layers per pipeline stage), or drop it.")
        if per_stage % per_virtual != 0:
            fail("--num-layers-per-virtual-pipeline-stage",
                 f"{m.num_layers} layers over PP={pp} give {per_stage} per stage, not divisible by {per_virtual}",
                 f"Use a divisor of {per_stage}.")
        if vp is not None and vp != per_stage // per_virtual:
            fail("--num-virtual-stages-per-pipeline-rank", f"{vp} contradicts --num-layers-per-virtual-pipeline-stage "
                 f"(which gives {per_stage // per_virtual})", "Give only one of the two.")
    elif vp is not None and pp == 1:
        fail("--num-virtual-stages-per-pipeline-rank", "needs --pipeline-model-parallel-size > 1", "Drop it, or use PP >= 2.")
    check_virtual_stages(m.num_layers, pp, vp, uneven)


def validate_schedule(cfg, num_microbatches: int) -> None:
    """The schedule's own rules for this configuration's first (smallest) micro-batch count."""
    from megatron_lite.pipeline.schedules import check_interleaving
    p = cfg.parallel
    vp, group = p.virtual_pipeline_model_parallel_size, p.microbatch_group_size_per_vp_stage
    # auto at VP = 2 may run ZB-V, which takes any m; an explicit group size asks for interleaving (auto.py)
    if vp is not None and (p.pipeline_schedule == "interleaved" or
                           (p.pipeline_schedule == "auto" and (vp != 2 or group is not None))):
        check_interleaving(p.pipeline_model_parallel_size, vp, num_microbatches, group)


__all__ = ["ConfigError", "stage_layer_counts", "layers_for_stage", "check_virtual_stages", "derive_virtual_stages",
           "validate_layout", "validate_schedule", "is_v_shape"]
