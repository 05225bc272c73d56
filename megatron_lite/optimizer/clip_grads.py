"""Global gradient norm, clipping and zero counting over every TP / PP / DP shard.

Each element of the full model must be counted exactly once:
- TP-replicated parameters (norms, biases of row-parallel layers, position embeddings) are identical on
  every TP rank, so only TP rank 0 counts them;
- the tied word embedding's last-stage copy (`shared_embedding` on a rank that is not the first stage)
  duplicates the first stage's, so it is skipped;
- with the distributed optimizer each DP rank holds a disjoint shard, so the sum runs over DP as well.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from megatron_lite import collectives, parallel_state


def counts_toward_norm(model_param: torch.nn.Parameter) -> bool:
    """True if this rank's copy of the parameter is the one counted in global statistics."""
    if getattr(model_param, "shared_embedding", False) and not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        return False
    if getattr(model_param, "tensor_model_parallel", False):
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0


def get_grad_norm_fp32(grads_for_norm: Iterable[torch.Tensor], groups: list) -> float:
    """L2 norm of all given gradients, summed in fp64 over `groups` (each all-reduced in turn)."""
    grads = [grad.detach() for grad in grads_for_norm]
    total = torch.zeros(1, dtype=torch.float64)
    if grads:
        # One multi-tensor pass for the per-tensor norms (fp32, like Megatron's multi_tensor_l2norm), then
        # their squares summed in fp64: no fp64 copy of every gradient.
        norms = torch._foreach_norm(grads)
        total += torch.stack(norms).double().pow(2).sum()
    for group in groups:
        collectives.all_reduce(total, group=group)
    return float(total.sqrt().item())


def clip_grad_by_total_norm_fp32(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale every gradient (all copies, not only the counted ones) by max_norm / total_norm if above 1."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(list(grads), clip_coeff)  # one multi-tensor kernel instead of a launch per tensor


def count_zeros_fp32(grads_for_norm: Iterable[torch.Tensor], groups: list) -> int:
    total = torch.zeros(1, dtype=torch.float64)
    for grad in grads_for_norm:
        total += grad.numel() - torch.count_nonzero(grad)
    for group in groups:
        collectives.all_reduce(total, group=group)
    return int(total.item())


def any_nonfinite(grads: Iterable[Optional[torch.Tensor]], groups: list) -> bool:
    """True on every rank if any rank's gradient holds inf/nan (so all ranks skip the step together)."""
    found = torch.zeros(1)
    for grad in grads:
        if grad is not None and not torch.isfinite(grad).all():
            found.fill_(1.0)
            break
    for group in groups:
        collectives.all_reduce(found, group=group, op="max")
    return bool(found.item() > 0)
