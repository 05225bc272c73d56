"""Kernels from Transformer Engine and Apex, imported lazily (neither is a dependency; both need CUDA).

Every function here has the signature of the reference op it replaces (kernels/norm.py, attention.py,
tensor_parallel/cross_entropy.py), so the registry can swap them in without the model knowing.
These paths only run on a CUDA machine with the library installed; tests/unit/test_kernels.py compares
them with the reference there and skips them (with the reason) elsewhere.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, Optional

import torch


@functools.lru_cache(maxsize=None)
def module_available(name: str) -> bool:
    """True when `name` imports. Import errors of broken installs (e.g. a TE built for another torch)
    count as unavailable: the registry then falls back instead of crashing at start-up."""
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001  (ImportError, OSError from missing .so files, RuntimeError ...)
        return False


def te_available() -> bool:
    return torch.cuda.is_available() and module_available("transformer_engine.pytorch")


def apex_norm_available() -> bool:
    return torch.cuda.is_available() and module_available("apex.normalization.fused_layer_norm")


def apex_adam_available() -> bool:
    return torch.cuda.is_available() and module_available("apex.optimizers")


def hopper_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


# ---- Apex: functional fused norms ---------------------------------------------------------------
def apex_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    return fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), eps)


def apex_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    return fused_rms_norm_affine(x, weight, (x.shape[-1],), eps)


# ---- Transformer Engine -------------------------------------------------------------------------
# TE's kernels live in modules that own their parameters. We keep one parameter-free module per shape
# and run it with our parameters through torch.func.functional_call, so the model's parameters (names,
# TP metadata, init, checkpoints) stay exactly those of the local implementation.
_TE_MODULES: dict[tuple, Any] = {}


def _te_module(key: tuple, build) -> Any:
    if key not in _TE_MODULES:
        _TE_MODULES[key] = build()
    return _TE_MODULES[key]


def te_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    import transformer_engine.pytorch as te
    module = _te_module(("ln", x.shape[-1], eps, x.dtype), lambda: te.LayerNorm(
        x.shape[-1], eps=eps, params_dtype=x.dtype, device=x.device))
    return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))


def te_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    import transformer_engine.pytorch as te
    module = _te_module(("rms", x.shape[-1], eps, x.dtype), lambda: te.RMSNorm(
        x.shape[-1], eps=eps, params_dtype=x.dtype, device=x.device))
    return torch.func.functional_call(module, {"weight": weight}, (x,))


def te_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, causal: bool = True) -> torch.Tensor:
    """TE DotProductAttention (its flash / cuDNN fused kernels) on q [b, heads, s, d], k, v [b, groups, s, d];
    returns [b, heads, s, d] like the reference. TE wants [b, s, heads, d] ("bshd")."""
    import transformer_engine.pytorch as te
    b, heads, s, d = q.shape
    groups = k.shape[1]
    mask_type = "arbitrary" if attention_mask is not None else ("causal" if causal else "no_mask")
    module = _te_module(("dpa", heads, groups, d, dropout_p, mask_type), lambda: te.DotProductAttention(
        heads, d, num_gqa_groups=groups, attention_dropout=dropout_p, qkv_format="bshd", attn_mask_type=mask_type))
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = module(q, k, v, attention_mask=attention_mask)  # [b, s, heads * d]
    return out.view(b, s, heads, d).transpose(1, 2)


def te_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """TE's fused (Triton) vocab-parallel cross entropy: per-token loss, no fp32 copy of the logits.
    `tp_group` is the process_groups.Group the vocabulary is split over (None: one rank)."""
    from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

    handle = tp_group.handle if tp_group is not None and tp_group.size > 1 else None
    return parallel_cross_entropy(logits, target, 0.0, False, handle).float()


def te_cross_entropy_available() -> bool:
    return te_available() and module_available("transformer_engine.pytorch.cross_entropy")


def te_fp8_linear(fp8_format: str) -> Callable:
    """A GEMM (x, weight, bias=None) -> y run by a Transformer Engine Linear under fp8_autocast: the fp8
    path for --fp8-format. One TE module per weight, because TE keeps each GEMM's fp8 scaling history in
    its module; our weight and bias are swapped in with functional_call, so parameters stay ours. The TE
    module is built on the meta device: its own (unused) weight takes no memory."""
    import transformer_engine.pytorch as te
    modules: dict[int, Any] = {}

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if id(weight) not in modules:
            modules[id(weight)] = te.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                            params_dtype=weight.dtype, device="meta")
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        with fp8_autocast(fp8_format):
            return torch.func.functional_call(modules[id(weight)], params, (x,))
    return linear


def fp8_autocast(fp8_format: Optional[str]) -> contextlib.AbstractContextManager:
    """TE's fp8_autocast with Megatron's recipe defaults (delayed scaling, amax history 1024, max);
    a null context without --fp8-format."""
    if fp8_format is None:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format
    fmt = Format.HYBRID if fp8_format == "hybrid" else Format.E4M3
    recipe = DelayedScaling(fp8_format=fmt, amax_history_len=1024, amax_compute_algo="max")
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)
