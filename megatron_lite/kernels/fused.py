"""Plain-torch fast paths and the explicit twins they are tested against.

- `torch_rms_norm`: torch's native F.rms_norm (one kernel on GPU) for the reference's HF-style RMSNorm.
- `sdpa_attention`: SDPA with GQA handled inside the kernel (enable_gqa) instead of materialising
  repeated keys/values, optionally pinned to one SDPA backend (flash / efficient / cuDNN / math).
- `unfused_attention`: Megatron's unfused path, matmul + masked softmax + matmul, written out; it is the
  reference every attention kernel is compared with in tests/unit/test_kernels.py.
- `compiled(fn)`: a torch.compile'd copy of an elementwise reference (bias+GeLU, SwiGLU, RoPE), which
  fuses it into one kernel (Triton on GPU, C++ on CPU). Compiled lazily on first call, so merely
  choosing it costs nothing.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_lite.kernels import activations, rope


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm; the same as kernels.norm.rms_norm in fp32. In bf16/fp16 torch multiplies by the weight
    before the final rounding, HF after it: the results differ by at most one rounding of the low
    precision type (the tests allow exactly that)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                  "math": "MATH"}


def sdpa_context(backend: Optional[str]) -> contextlib.AbstractContextManager:
    """Pin SDPA to one backend ("flash", "efficient", "cudnn", "math"), or let torch choose (None)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[backend])])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   dropout_p: float = 0.0, causal: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """kernels.attention.attention, with GQA done by the kernel (no repeat_interleave copies of k and v)."""
    gqa = k.shape[1] != q.shape[1]
    with sdpa_context(backend):
        if attention_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout_p, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa)


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      dropout_p: float = 0.0, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, step by step (scores in fp32 for stability, like Megatron's
    attention_softmax_in_fp32), for q [b, heads, s, d] and k, v [b, groups, s, d]."""
    heads, groups = q.shape[1], k.shape[1]
    if groups != heads:
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if attention_mask is None and causal:
        s_q, s_k = q.shape[2], k.shape[2]
        attention_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1)
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), built once per function. dynamic=False: shapes are fixed in pretraining, and
    static shapes give the best fused kernels."""
    return torch.compile(fn, dynamic=False, fullgraph=True)


def compiled_bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return compiled(activations.bias_gelu)(x, bias)


def compiled_swiglu(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return compiled(activations.swiglu)(x, bias)


def compiled_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return compiled(rope.apply_rotary)(x, cos, sin)


def torch_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-token cross entropy (fp32) when this rank holds the whole vocabulary (TP = 1): torch's fused
    log-softmax + NLL (3 passes over the logits instead of the vocab-parallel path's max / sub / exp /
    sum / div). Same result as tensor_parallel.vocab_parallel_cross_entropy at TP = 1, padded -inf
    entries included. Refuses a split vocabulary (`tp_group` of more than one rank)."""
    if tp_group is not None and tp_group.size > 1:
        raise ValueError("torch_cross_entropy needs the whole vocabulary on this rank (TP = 1)")
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return loss.view(target.shape)
