"""Optimizers: fp32 main weights and loss scaling (MegatronOptimizer), the distributed optimizer,
global-norm clipping, LR/weight-decay schedules, and per-rank memory accounting."""
from __future__ import annotations

from typing import Optional

from torch import nn

from megatron_lite.config import Config
from megatron_lite.optimizer.memory import memory_report
from megatron_lite.optimizer.optimizer import MegatronOptimizer
from megatron_lite.process_groups import ProcessGroups


def get_megatron_optimizer(config: Config, model_chunks: list[nn.Module],
                           groups: Optional[ProcessGroups] = None) -> MegatronOptimizer:
    """One optimizer over all of this rank's model chunks (DDP-wrapped; required with --use-distributed-optimizer).

    --optimizer adam|sgd, --bf16/--fp16 (fp32 main params, loss scaling for fp16), --use-distributed-optimizer
    (states sharded over DP), --clip-grad (global L2 norm), weight decay on 2+-dim weights only.
    `groups` (default: one process) are the groups global statistics are reduced over.
    """
    return MegatronOptimizer(config, list(model_chunks), groups)


__all__ = ["MegatronOptimizer", "get_megatron_optimizer", "memory_report"]
