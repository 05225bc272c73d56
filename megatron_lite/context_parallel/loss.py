"""The language-model loss under context parallelism: each CP rank holds part of every sequence, so the
masked mean is taken over all tokens of the micro-batch across CP."""
from __future__ import annotations

import torch

from megatron_lite import collectives
from megatron_lite.process_groups import Group


def cp_masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor, cp_group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, the micro-batch's loss to report).

    The masked sum and the token count are all-reduced over CP, so the reported value is the one-process
    masked mean in every layout. The backpropagated loss is this rank's masked sum / the global count,
    times CP: DDP averages gradients over DP x CP, and the CP average of (CP x each rank's share) is the
    sum of the shares, the one-process gradient. A micro-batch whose tokens are all masked gives 0, not NaN.
    """
    losses, loss_mask = losses.float().reshape(-1), loss_mask.float().reshape(-1)
    local_sum = torch.sum(losses * loss_mask)
    totals = torch.stack([local_sum.detach(), loss_mask.sum()]).to(torch.float64)
    collectives.all_reduce(totals, cp_group)
    count = totals[1].clamp(min=1.0)
    loss = local_sum * cp_group.size / count.to(local_sum.dtype)
    reported = (totals[0] / count).to(torch.float32)
    return loss, reported
