"""AdamW implementations with the same update (decoupled weight decay, bias correction, eps outside the
sqrt), from fastest to plainest: TE FusedAdam, Apex FusedAdam, torch's fused kernel, torch's foreach
(multi-tensor) loop, torch's per-parameter loop (the reference).

The optimizer wrapper (optimizer/optimizer.py) asks `select_adam_impl` which one to use and builds it
with `build_adam`; the state keys ("exp_avg", "exp_avg_sq") are the same in all of them, so checkpoints
do not depend on the choice.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lite.kernels import external

ADAM_IMPLS = ("te", "apex", "torch_fused", "foreach", "for_loop")


def torch_fused_supported(device_type: str) -> bool:
    """torch's fused AdamW exists for CUDA, and for CPU since torch 2.4."""
    if device_type == "cuda":
        return True
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return device_type == "cpu" and version >= (2, 4)


def select_adam_impl(use_fused: bool, device_type: Optional[str] = None, transformer_impl: str = "local") -> str:
    """The fastest AdamW for `device_type` (default: cuda when present), or "for_loop" with --no-fused-adam.

    On CUDA TE's and Apex's multi-tensor kernels are preferred (they also take fp32 master weights), then
    torch's fused kernel. On CPU torch's fused kernel (one vectorised pass per tensor) beats foreach.
    """
    if not use_fused:
        return "for_loop"
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if transformer_impl == "transformer_engine" and external.te_available() and \
                external.module_available("transformer_engine.pytorch.optimizers"):
            return "te"
        if external.apex_adam_available():
            return "apex"
    if torch_fused_supported(device_type):
        return "torch_fused"
    return "foreach"


def build_adam(param_groups: list[dict], impl: str, *, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float) -> torch.optim.Optimizer:
    """An AdamW (decoupled weight decay) over `param_groups` using implementation `impl`."""
    if impl == "te":
        from transformer_engine.pytorch.optimizers import FusedAdam
        return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    if impl == "apex":
        from apex.optimizers import FusedAdam
        return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    if impl not in ADAM_IMPLS:
        raise ValueError(f"unknown Adam implementation {impl!r}; choose from {ADAM_IMPLS}")
    kwargs = {"fused": True} if impl == "torch_fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
