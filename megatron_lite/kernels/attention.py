"""Reference attention kernel: torch's scaled_dot_product_attention (flash / memory-efficient kernels on
GPU, the math path on CPU)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, causal: bool = True) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v for q [b, heads, s, d] and k, v [b, groups, s, d] (GQA when groups < heads).

    attention_mask: [b or 1, 1, s, s] bool, True = masked out (Megatron's convention); when given it
    replaces the causal mask (Megatron's masks already contain it). Query head h uses key/value group
    h // (heads / groups), as in Megatron and Hugging Face's repeat_kv.
    """
    heads, groups = q.shape[1], k.shape[1]
    if groups != heads:
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    if attention_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
