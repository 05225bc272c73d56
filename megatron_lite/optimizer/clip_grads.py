"""Global gradient norm, clipping and zero counting over every TP / PP / DP shard.

Each element of the full model must be counted exactly once:
- TP-replicated parameters (norms, biases of row-parallel layers, position embeddings) are identical on
  every TP rank, so only TP rank 0 counts them;
- the tied word embedding's last-stage copy (`shared_embedding` and `tied_copy`; with ZB-V on the first
  stage's rank too) duplicates the first stage's, so it is skipped;
- with the distributed optimizer each DP rank holds a disjoint shard, so the sum runs over DP as well.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from megatron_lite import collectives
from megatron_lite.process_groups import Group, ProcessGroups
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of


def counts_toward_norm(model_param: torch.nn.Parameter, groups: ProcessGroups) -> bool:
    """True if this rank's copy of the parameter is the one counted in global statistics."""
    if getattr(model_param, "shared_embedding", False) and getattr(model_param, "tied_copy", not groups.is_first_stage):
        return False  # the output layer's copy (on the first stage too with ZB-V's V)
    if shard_spec_of(model_param).is_sharded:
        return True
    return groups.tp.rank == 0


def _reduced(local: Optional[torch.Tensor], groups: list, op: str = "sum") -> float:
    """`local` (a 1-element fp64 tensor on the gradients' device, or None when this rank has no gradients)
    reduced over each group in turn. Starting from the gradients' own device keeps the statistics on the
    GPU until the one host copy at the end; a rank without gradients starts from the group's device."""
    if local is None:
        local = torch.zeros(1, dtype=torch.float64, device=collectives.device_for(groups[0] if groups else None))
    for group in groups:
        collectives.all_reduce(local, group=group, op=op)
    return float(collectives.to_host(local)[0])


def get_grad_norm_fp32(grads_for_norm: Iterable[torch.Tensor], groups: list) -> float:
    """L2 norm of all given gradients, summed in fp64 over `groups` (each all-reduced in turn)."""
    grads = [grad.detach() for grad in grads_for_norm]
    local = None
    if grads:
        # One multi-tensor pass for the per-tensor norms (fp32, like Megatron's multi_tensor_l2norm), then
        # their squares summed in fp64: no fp64 copy of every gradient.
        norms = torch._foreach_norm(grads)
        local = torch.stack(norms).double().pow(2).sum().reshape(1)
    return math.sqrt(_reduced(local, groups))


def clip_grad_by_total_norm_fp32(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale every gradient (all copies, not only the counted ones) by max_norm / total_norm if above 1."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(list(grads), clip_coeff)  # one multi-tensor kernel instead of a launch per tensor


def count_zeros_fp32(grads_for_norm: Iterable[torch.Tensor], groups: list) -> int:
    grads = list(grads_for_norm)
    local = None
    if grads:
        local = sum((grad.numel() - torch.count_nonzero(grad)).double() for grad in grads).reshape(1)
    return int(_reduced(local, groups))


def any_nonfinite(grads: Iterable[Optional[torch.Tensor]], groups: list) -> bool:
    """True on every rank if any rank's gradient holds inf/nan (so all ranks skip the step together)."""
    present = [grad for grad in grads if grad is not None]
    local = None
    if present:
        local = torch.stack([(~torch.isfinite(grad)).any() for grad in present]).any().double().reshape(1)
    return _reduced(local, groups, op="max") > 0.0


class NonFiniteStepError(RuntimeError):
    """Raised on every rank together when a step's loss or grad norm is NaN/Inf on any rank: the update was
    not applied. `loss_rank` / `grad_rank`: the lowest global rank that saw a non-finite loss / grad norm."""

    def __init__(self, grad_norm: float, loss_rank: Optional[int], grad_rank: Optional[int]):
        self.grad_norm, self.loss_rank, self.grad_rank = grad_norm, loss_rank, grad_rank
        self.loss: Optional[float] = None  # the reported lm loss, filled in by the training step
        super().__init__(self.describe())

    def describe(self) -> str:
        seen = []
        if self.loss_rank is not None:
            seen.append(f"non-finite loss on rank {self.loss_rank}")
        if self.grad_rank is not None:
            seen.append(f"non-finite grad norm ({self.grad_norm}) on rank {self.grad_rank}")
        return " and ".join(seen)


def check_finite_step(nonfinite_loss: bool, grad_norm: float, world: Group) -> None:
    """Every rank learns, in one all-reduce over `world`, the lowest rank with a non-finite loss and the lowest
    with a non-finite grad norm; all raise NonFiniteStepError together if there is either."""
    rank, nobody = world.rank, float("inf")
    local = [rank if nonfinite_loss else nobody, rank if not math.isfinite(grad_norm) else nobody]
    loss_rank, grad_rank = collectives.all_reduce_scalars(local, world, op="min")
    if math.isfinite(loss_rank) or math.isfinite(grad_rank):
        raise NonFiniteStepError(grad_norm, int(loss_rank) if math.isfinite(loss_rank) else None,
                                 int(grad_rank) if math.isfinite(grad_rank) else None)
