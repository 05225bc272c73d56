"""Optimizer offload to host memory (ZeRO-Offload): which part of this rank's shard is stepped on the host.

With --optimizer-cpu-offload, the first `--optimizer-offload-fraction` of this rank's main-parameter
elements (in the optimizer's own order: buckets, then parameters, a MainParam split at the boundary) get an
fp32 main copy in host memory (pinned when CUDA is present, so copies can run asynchronously) and Adam
moments next to it, stepped by torch's CPU AdamW (its fused kernel where torch has one). The rest stays
on the device as before. Per step: the reduced gradient (after unscaling and clipping on the device) is
copied to the host, the host optimizer steps, and the updated values are copied back into the model
parameter (MegatronOptimizer.step). On a CPU-only machine "host" is a separate allocation on the same CPU,
so the same path runs and is tested; the update equals the device one because the arithmetic is the same
(on CPU both sides use the same fused kernel, so bitwise).
"""
from __future__ import annotations

import torch

from megatron_lite.kernels.adam import torch_fused_supported


def host_copy(values: torch.Tensor) -> torch.Tensor:
    """A new fp32 host tensor holding `values` (pinned with CUDA, so device<->host copies are async)."""
    out = torch.empty(values.shape, dtype=torch.float32, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(values)
    return out


def split_for_offload(main_params: list, fraction: float, location: str, make_main_param) -> list:
    """Move the first round(fraction x elements) of `main_params` to `location` ("host", or "disk" for
    optimizer/nvme.py), splitting one MainParam at the boundary. `make_main_param(m, start, end, location)` builds a MainParam for a flat sub-slice of `m`'s
    parameter. Returns the new list (same order, same elements)."""
    total = sum(m.end - m.start for m in main_params)
    remaining = round(fraction * total)
    result = []
    for m in main_params:
        numel = m.end - m.start
        take = min(numel, remaining)
        remaining -= take
        if take == 0:
            result.append(m)
            continue
        result.append(make_main_param(m, m.start, m.start + take, location))
        if take < numel:
            result.append(make_main_param(m, m.start + take, m.end, "device"))
    return result


def build_host_adam(param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """torch's CPU AdamW: the fused kernel where this torch has one for CPU, else foreach."""
    kwargs = {"fused": True} if torch_fused_supported("cpu") else {"foreach": True}
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
