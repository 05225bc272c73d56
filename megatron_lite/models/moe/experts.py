"""The routed experts of one MoE layer on this rank: GEMMs over tokens grouped by local expert.

Parameters are named by the **global** expert index, `local_experts.{e}.linear_fc1.weight` (megatron-core's
SequentialMLP names, whose torch checkpoints use local indices; ours are global so every layout shares one
name set). An EP rank holds experts [ep_rank * E/EP, (ep_rank + 1) * E/EP). Each expert's MLP is split over
the expert-TP group like a column-parallel fc1 ([gate; up] with stride 2 under SwiGLU) and a row-parallel
fc2 (ShardSpec axis "etp"); the partial fc2 outputs of the ETP ranks are summed by the token dispatcher.
No biases (as megatron-core's grouped-GEMM experts); config refuses MoE with linear biases.

--moe-grouped-gemm runs all local experts as one `torch._grouped_mm` (forward and backward) when this torch
has it and it accepts these shapes and dtype (probed once); otherwise, and without the flag, a loop of
GEMMs. Both give the same results (tests/unit/test_moe.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn

from megatron_lite.config import Config
from megatron_lite.kernels.registry import select_kernels
from megatron_lite.models.gpt.mlp import output_init_std
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec
from megatron_lite.tensor_parallel.utils import set_init


def _weight(rows: int, cols: int, spec: ShardSpec, std: float, config: Config, device) -> nn.Parameter:
    param = nn.Parameter(torch.empty(rows, cols, dtype=config.params_dtype, device=device))
    set_shard_spec(param, spec)
    set_init(param, "normal", std)
    param.expert_parallel = True  # reduced over the expert-data-parallel group (ddp.py)
    return param


class _Linear(nn.Module):
    """A weight holder, so names read `linear_fc1.weight` like every other MLP."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


class ExpertMLP(nn.Module):
    """One expert's shard on this ETP rank: fc1 [ffn(*2)/etp, h], fc2 [h, ffn/etp]."""

    def __init__(self, config: Config, etp_size: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        m, ffn = config.model, config.moe.moe_ffn_hidden_size
        fc1_rows = ffn * (2 if m.swiglu else 1) // etp_size
        self.linear_fc1 = _Linear(_weight(fc1_rows, m.hidden_size, ShardSpec(0, 2 if m.swiglu else 1, "etp"),
                                          m.init_method_std, config, device))
        self.linear_fc2 = _Linear(_weight(m.hidden_size, ffn // etp_size, ShardSpec(1, 1, "etp"),
                                          output_init_std(config), config, device))


@functools.lru_cache(maxsize=None)
def grouped_mm_works(hidden: int, ffn_rows: int, ffn: int, dtype: torch.dtype, device_type: str) -> bool:
    """Whether torch._grouped_mm runs forward and backward for these shapes here (alignment, dtype, device)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(3, hidden, dtype=dtype, device=device_type, requires_grad=True)
        w1 = torch.randn(2, ffn_rows, hidden, dtype=dtype, device=device_type).transpose(1, 2).requires_grad_()
        w2 = torch.randn(2, hidden, ffn, dtype=dtype, device=device_type).transpose(1, 2).requires_grad_()
        offs = torch.tensor([1, 3], dtype=torch.int32, device=device_type)
        h = torch._grouped_mm(x, w1, offs=offs)[:, :ffn]
        y = torch._grouped_mm(h.contiguous(), w2, offs=offs)
        y.backward(torch.ones_like(y))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _contiguous_grad(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: grad.contiguous())  # _grouped_mm's backward needs dense strides
    return tensor


class GroupedExperts(nn.Module):
    """This rank's local experts. forward(tokens [N, h] grouped by local expert, counts per local expert)
    returns each token's (ETP-partial) expert output [N, h]."""

    def __init__(self, config: Config, expert_indices: list[int], etp_size: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.swiglu = config.model.swiglu
        self.kernels = select_kernels(config)
        self.local_experts = nn.ModuleDict({str(e): ExpertMLP(config, etp_size, device) for e in expert_indices})
        self.grouped = config.moe.moe_grouped_gemm

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        return self.kernels.swiglu_fn(h) if self.swiglu else self.kernels.bias_gelu_fn(h)

    def use_grouped_gemm(self) -> bool:
        first = next(iter(self.local_experts.values()))
        fc1, fc2 = first.linear_fc1.weight, first.linear_fc2.weight
        return self.grouped and grouped_mm_works(fc1.shape[1], fc1.shape[0], fc2.shape[1], fc1.dtype, fc1.device.type)

    def forward(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if tokens.shape[0] > 0 and self.use_grouped_gemm():
            return self._grouped(tokens, counts)
        outputs, start = [], 0
        for expert, count in zip(self.local_experts.values(), counts):
            chunk = tokens[start:start + count]  # may be empty: the graph still reaches every rank's collectives
            h = self._activation(torch.matmul(chunk, expert.linear_fc1.weight.t()))
            outputs.append(torch.matmul(h, expert.linear_fc2.weight.t()))
            start += count
        return torch.cat(outputs, dim=0)

    def _grouped(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        experts = list(self.local_experts.values())
        w1 = torch.stack([e.linear_fc1.weight for e in experts]).transpose(1, 2)  # [E_local, h, ffn(*2)]
        w2 = torch.stack([e.linear_fc2.weight for e in experts]).transpose(1, 2)  # [E_local, ffn, h]
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(tokens.device)
        h = _contiguous_grad(torch._grouped_mm(tokens.contiguous(), w1, offs=offs))
        h = self._activation(h).contiguous()
        return _contiguous_grad(torch._grouped_mm(h, w2, offs=offs))
