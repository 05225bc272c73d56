"""Global gradient norm, clipping and zero counting over every TP / PP / DP shard.

Each element of the full model must be counted exactly once:
- TP-replicated parameters (norms, biases of row-parallel layers, position embeddings) are identical on
  every TP rank, so only TP rank 0 counts them;
- the tied word embedding's last-stage copy (`shared_embedding` on a rank that is not the first stage)
  duplicates the first stage's, so it is skipped;
- with the distributed optimizer each DP rank holds a disjoint shard, so the sum runs over DP as well.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from megatron_lite import collectives
from megatron_lite.process_groups import ProcessGroups
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of


def counts_toward_norm(model_param: torch.nn.Parameter, groups: ProcessGroups) -> bool:
    """True if this rank's copy of the parameter is the one counted in global statistics."""
    if getattr(model_param, "shared_embedding", False) and not groups.is_first_stage:
        return False
    if shard_spec_of(model_param).is_sharded:
        return True
    return groups.tp.rank == 0


def _sum_over(value: float, groups: list) -> float:
    for group in groups:
        value = collectives.all_reduce_scalar(value, group)
    return value


def get_grad_norm_fp32(grads_for_norm: Iterable[torch.Tensor], groups: list) -> float:
    """L2 norm of all given gradients, summed in fp64 over `groups` (each all-reduced in turn)."""
    grads = [grad.detach() for grad in grads_for_norm]
    total = 0.0
    if grads:
        # One multi-tensor pass for the per-tensor norms (fp32, like Megatron's multi_tensor_l2norm), then
        # their squares summed in fp64: no fp64 copy of every gradient.
        norms = torch._foreach_norm(grads)
        total = float(torch.stack(norms).double().pow(2).sum())
    return math.sqrt(_sum_over(total, groups))


def clip_grad_by_total_norm_fp32(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale every gradient (all copies, not only the counted ones) by max_norm / total_norm if above 1."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(list(grads), clip_coeff)  # one multi-tensor kernel instead of a launch per tensor


def count_zeros_fp32(grads_for_norm: Iterable[torch.Tensor], groups: list) -> int:
    total = 0
    for grad in grads_for_norm:
        total += grad.numel() - int(torch.count_nonzero(grad))
    return int(_sum_over(float(total), groups))


def any_nonfinite(grads: Iterable[Optional[torch.Tensor]], groups: list) -> bool:
    """True on every rank if any rank's gradient holds inf/nan (so all ranks skip the step together)."""
    found = any(grad is not None and not bool(torch.isfinite(grad).all()) for grad in grads)
    for group in groups:
        found = collectives.any_rank(found, group)
    return found
