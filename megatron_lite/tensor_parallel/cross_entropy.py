"""Cross entropy over a vocabulary split across TP ranks, without gathering the full logits.

Each rank holds logits for its vocabulary slice. Three all-reduces of [tokens]-sized tensors give the
global max, the global sum of exp, and the target's logit (owned by exactly one rank). Backward is
local: softmax - one_hot(target) on this rank's slice.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lite import collectives
from megatron_lite.process_groups import Group

_ONE_RANK = Group.single("tp")


def all_reduce_over_tp(x: torch.Tensor, tp_group: Group, op: str = "sum") -> torch.Tensor:
    """In place over the TP group (nothing with one TP rank); returns x."""
    if tp_group.size > 1:
        collectives.all_reduce(x, tp_group, op=op)
    return x


def local_targets(target: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target index within this rank's vocabulary slice [..., 1] (0 where it is not here), mask of the
    targets outside the slice)."""
    outside = (target < vocab_start) | (target >= vocab_start + vocab_local)
    return (target - vocab_start).masked_fill(outside, 0).unsqueeze(-1), outside


def subtract_one_hot_(softmax: torch.Tensor, local_target: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """softmax - one_hot(target) on this rank's slice, in place: the gradient of the loss w.r.t. the logits."""
    return softmax.scatter_add_(-1, local_target, (~outside).to(softmax.dtype).unsqueeze(-1).neg())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, tp_group: Group) -> torch.Tensor:
        logits = logits.float()
        logits_max = logits.max(dim=-1)[0]
        all_reduce_over_tp(logits_max, tp_group, op="max")
        logits = logits - logits_max.unsqueeze(-1)

        start = tp_group.rank * logits.shape[-1]
        local_target, outside = local_targets(target, start, logits.shape[-1])
        predicted = logits.gather(-1, local_target).squeeze(-1).masked_fill(outside, 0.0)
        all_reduce_over_tp(predicted, tp_group)

        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(dim=-1)
        all_reduce_over_tp(sum_exp, tp_group)
        loss = sum_exp.log() - predicted

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        grad = subtract_one_hot_(softmax, local_target, outside)  # reuse the saved buffer: not needed after this
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 tp_group: Optional[Group] = None) -> torch.Tensor:
    """Per-token loss (fp32, shape of target) for logits [..., vocab/tp] split over the ranks of `tp_group`
    in rank order (padded entries should be -inf; default: one rank holding the whole vocabulary). Works
    for [s, b, v] or [b, s, v] with target [s, b] or [b, s]."""
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group or _ONE_RANK)
