"""The dense MLP of a transformer layer (and of MoE shared experts), and the residual-output init.

Lives apart from transformer.py so models/moe/ can build shared experts from it without an import cycle.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from megatron_lite.config import Config
from megatron_lite.kernels.registry import select_kernels
from megatron_lite.process_groups import Group
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def output_init_std(config: Config) -> float:
    """Megatron's scaled init for projections that write into the residual stream."""
    return config.model.init_method_std / math.sqrt(2.0 * config.model.num_layers)


class MLP(nn.Module):
    """fc1 -> GeLU (tanh, GPT-2) or SwiGLU (fc1 holds [gate; up], split over TP with stride 2) -> fc2.
    `ffn_hidden_size` overrides --ffn-hidden-size (MoE shared experts)."""

    def __init__(self, config: Config, tp_group: Group, device: Optional[torch.device] = None,
                 ffn_hidden_size: Optional[int] = None) -> None:
        super().__init__()
        m = config.model
        ffn = ffn_hidden_size or m.ffn_hidden_size
        self.swiglu = m.swiglu
        self.kernels = select_kernels(config)
        common = dict(sequence_parallel=config.parallel.sequence_parallel, params_dtype=config.params_dtype, device=device,
                      tp_group=tp_group)
        self.linear_fc1 = ColumnParallelLinear(m.hidden_size, ffn * (2 if m.swiglu else 1),
                                               bias=m.add_bias_linear, init_std=m.init_method_std,
                                               stride=2 if m.swiglu else 1, **common)
        self.linear_fc2 = RowParallelLinear(ffn, m.hidden_size, bias=m.add_bias_linear,
                                            init_std=output_init_std(config), **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        return self.linear_fc2(self.kernels.swiglu_fn(h) if self.swiglu else self.kernels.bias_gelu_fn(h))
