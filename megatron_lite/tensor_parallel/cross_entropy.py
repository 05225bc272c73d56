"""Cross entropy over a vocabulary split across TP ranks, without gathering the full logits.

Each rank holds logits for its vocabulary slice. Three all-reduces of [tokens]-sized tensors give the
global max, the global sum of exp, and the target's logit (owned by exactly one rank). Backward is
local: softmax - one_hot(target) on this rank's slice.
"""
from __future__ import annotations

import torch

from megatron_lite import collectives, parallel_state


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        collectives.all_reduce(x, parallel_state.get_tensor_model_parallel_group(), op=op)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits_max = logits.max(dim=-1)[0]
        _all_reduce(logits_max, op="max")
        logits = logits - logits_max.unsqueeze(-1)

        vocab_local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
        outside = (target < start) | (target >= start + vocab_local)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(predicted)

        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp)
        loss = sum_exp.log() - predicted

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax  # reuse the saved buffer: it is not needed after this
        inside = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -inside)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss (fp32, shape of target) for logits [..., vocab/tp] split over TP ranks in rank order
    (padded entries should be -inf). Works for [s, b, v] or [b, s, v] with target [s, b] or [b, s]."""
    return _VocabParallelCrossEntropy.apply(logits, target)
