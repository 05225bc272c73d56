"""Which transformer layers live on which pipeline stage, and building a rank's model chunks.

Layer numbers are global (0-based), so a layer's parameter names and its seeded initialisation are the
same in every layout (docs/internals.md). With virtual stages (interleaved 1F1B), model chunk v on pipeline
rank r holds virtual stage v x PP + r: rank 0 holds stages 0, PP, 2PP, ...
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from megatron_lite.errors import ConfigError
from megatron_lite.process_groups import ProcessGroups

ModelProvider = Callable[[bool, bool, list], nn.Module]


def layers_for_stage(num_layers: int, pp_size: int, pp_rank: int, vp_size: Optional[int] = None, vp_rank: int = 0,
                     first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None) -> list[int]:
    """Global layer numbers held by pipeline rank `pp_rank` (model chunk `vp_rank` with virtual stages).

    Layers are split evenly, except that `first_stage_layers`/`last_stage_layers`
    (--decoder-first/last-pipeline-num-layers) fix the count on the first/last stage and the rest is split
    evenly over the middle stages. Raises ConfigError for a layout that does not divide.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside [0, {pp_size})")
    if vp_size is not None and vp_size > 1:
        if pp_size == 1:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage: needs --pipeline-model-parallel-size > 1. "
                              "Drop it, or use PP >= 2.")
        if first_stage_layers is not None or last_stage_layers is not None:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage: cannot be combined with "
                              "--decoder-first/last-pipeline-num-layers. Drop one of them.")
        if num_layers % (pp_size * vp_size) != 0:
            raise ConfigError(f"--num-layers: {num_layers} layers are not divisible by PP x VP = {pp_size} x {vp_size}. "
                              f"Use a multiple of {pp_size * vp_size}.")
        if not 0 <= vp_rank < vp_size:
            raise ValueError(f"vp_rank {vp_rank} is outside [0, {vp_size})")
        per_virtual_stage = num_layers // (pp_size * vp_size)
        start = (vp_rank * pp_size + pp_rank) * per_virtual_stage
        return list(range(start, start + per_virtual_stage))

    counts = stage_layer_counts(num_layers, pp_size, first_stage_layers, last_stage_layers)
    start = sum(counts[:pp_rank])
    return list(range(start, start + counts[pp_rank]))


def stage_layer_counts(num_layers: int, pp_size: int, first_stage_layers: Optional[int] = None,
                       last_stage_layers: Optional[int] = None) -> list[int]:
    """Number of layers on each pipeline stage (no virtual stages)."""
    if pp_size == 1:
        return [num_layers]
    first, last = first_stage_layers, last_stage_layers
    middle_stages = pp_size - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0) or (middle_stages and middle_layers % middle_stages):
        raise ConfigError(f"--decoder-first/last-pipeline-num-layers: {num_layers} layers cannot be laid out as "
                          f"first={first}, last={last} plus an equal share on {middle_stages} middle stage(s). "
                          "Make first + last + (an equal share per middle stage) equal --num-layers.")
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def build_model_chunks(config, model_provider: ModelProvider, groups: Optional[ProcessGroups] = None) -> list[nn.Module]:
    """This rank's model chunks (one, or VP with virtual stages), each from
    `model_provider(pre_process, post_process, layer_numbers)`; `groups` (default: one process) gives
    this rank's pipeline position."""
    p, m = config.parallel, config.model
    groups = groups or ProcessGroups.single()
    pp_size, pp_rank = groups.pp.size, groups.pp.rank
    if pp_size != p.pipeline_model_parallel_size:
        raise ConfigError(f"--pipeline-model-parallel-size: the config says {p.pipeline_model_parallel_size} but the "
                          f"process groups have PP = {pp_size}. Pass groups=parallel_state.get_process_groups().")
    vp_size = p.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_rank in range(vp_size):
        layers = layers_for_stage(m.num_layers, pp_size, pp_rank, vp_size if vp_size > 1 else None, vp_rank,
                                  p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)
        first = pp_rank == 0 and vp_rank == 0
        last = pp_rank == pp_size - 1 and vp_rank == vp_size - 1
        chunks.append(model_provider(first, last, layers))
    return chunks
