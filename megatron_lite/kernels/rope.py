"""Rotary position embeddings, Hugging Face Llama's convention (rotate_half on the rotated channels)."""
from __future__ import annotations

import math
from typing import Optional

import torch


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                           original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.x RoPE scaling (HF rope_type "llama3", megatron-core's _apply_scaling): long wavelengths
    divided by `factor`, short ones kept, the band between interpolated smoothly."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_scaling_of(model_config) -> Optional[tuple]:
    """The llama3 scaling arguments of a ModelConfig (None without --use-rope-scaling)."""
    m = model_config
    if not getattr(m, "use_rope_scaling", False):
        return None
    return (m.rope_scaling_factor, m.rope_scaling_low_freq_factor, m.rope_scaling_high_freq_factor,
            m.rope_scaling_original_max_position_embeddings)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float,
                 dtype: torch.dtype = torch.float32, scaling: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [b, s]: each [s, b, 1, rotary_dim], ready for [s, b, heads, dim] tensors.

    Frequencies are computed in fp32 like HF (inv_freq = base^(-2i/d)), then cast to `dtype`.
    `scaling`: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) of Llama 3."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=position_ids.device).float() / rotary_dim))
    if scaling is not None:
        inv_freq = llama3_scaled_inv_freq(inv_freq, *scaling)
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
