"""Rotary position embeddings, Hugging Face Llama's convention (rotate_half on the rotated channels)."""
from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [b, s]: each [s, b, 1, rotary_dim], ready for [s, b, heads, dim] tensors.

    Frequencies are computed in fp32 like HF (inv_freq = base^(-2i/d)), then cast to `dtype`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=position_ids.device).float() / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1).transpose(0, 1)[:, :, None, :]  # [s, b, 1, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [s, b, heads, dim]; the rest pass through
    (--rotary-percent < 1)."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.numel() else x_rot
