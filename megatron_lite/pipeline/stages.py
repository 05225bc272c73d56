"""Building a rank's model chunks; which layers each stage holds is pipeline/layout.py's rule.

Layer numbers are global (0-based), so a layer's parameter names and its seeded initialisation are the
same in every layout (docs/internals.md). With virtual stages (interleaved 1F1B), model chunk v on pipeline
rank r holds virtual stage v x PP + r: rank 0 holds stages 0, PP, 2PP, ...; with ZB-V's V rank r holds
stages r and 2 PP - 1 - r, so rank 0 holds the first and the last (embedding, loss, tied output layer).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from megatron_lite.errors import ConfigError
from megatron_lite.pipeline.layout import is_v_shape, layers_for_stage, stage_layer_counts
from megatron_lite.pipeline.actions import virtual_stage
from megatron_lite.process_groups import ProcessGroups

ModelProvider = Callable[[bool, bool, list], nn.Module]


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
    v_shape = is_v_shape(config)
    chunks = []
    for vp_rank in range(vp_size):
        layers = layers_for_stage(m.num_layers, pp_size, pp_rank, vp_size if vp_size > 1 else None, vp_rank,
                                  p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers, v_shape)
        stage = virtual_stage(pp_size, pp_rank, vp_rank, v_shape)
        chunks.append(model_provider(stage == 0, stage == pp_size * vp_size - 1, layers))
    return chunks


__all__ = ["build_model_chunks", "layers_for_stage", "stage_layer_counts"]
