"""Reference activation kernels (plain torch)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GeLU with the tanh approximation: Hugging Face GPT-2's "gelu_new", so converted GPT-2 weights
    give the same logits. (Megatron's own default is the exact erf GeLU; the difference is < 1e-3.)"""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


def swiglu(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU on the last dim laid out as [gate; up] (Megatron's fc1 and Llama's gate_proj/up_proj):
    silu(gate) * up."""
    if bias is not None:
        x = x + bias
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up
