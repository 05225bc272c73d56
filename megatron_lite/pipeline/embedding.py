"""Tied input/output embeddings across pipeline stages.

With tied embeddings and PP > 1 the first stage holds the word embedding and the last stage holds a copy
(`output_layer.weight`), initialised from the same global name so both start equal (docs/internals.md).
Both are marked `shared_embedding=True`. Summing their gradients over the embedding group (first and last
rank of each pipeline) every step gives each copy the gradient of the one tied weight, so they stay equal
under any optimizer. With ZB-V's V both stages are chunks of rank 0: the sum is local and rank PP - 1,
still a member of the group, holds neither.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from megatron_lite import collectives
from megatron_lite.process_groups import ProcessGroups
from megatron_lite.tensor_parallel.shard_spec import reduced_grad


def shared_embedding_params(model_chunks: Iterable[nn.Module]) -> list[nn.Parameter]:
    """This rank's parameters marked shared_embedding=True, over all its model chunks."""
    return [param for chunk in model_chunks for param in chunk.parameters() if getattr(param, "shared_embedding", False)]


def allreduce_embedding_grads(model_chunks: Iterable[nn.Module], groups: ProcessGroups) -> None:
    """Sum the gradients (.main_grad when present, else .grad) of shared_embedding params over the
    embedding group. A no-op on ranks outside it and when the group has one member (PP = 1)."""
    if groups.pp.size == 1 or groups.embd is None:
        return
    params = shared_embedding_params(model_chunks)
    if len(params) == 2:  # ZB-V: the first and the last stage are chunks of this rank; the peer has none
        _sum_local(params)
        return
    if len(params) > 2:
        raise RuntimeError(f"{len(params)} parameters are marked shared_embedding on one rank; expected one "
                           "(the word embedding on the first stage or its copy on the last) or both (ZB-V)")
    if not params:  # untied embeddings, or ZB-V's last rank: nothing is shared here (the peer agrees)
        return
    param = params[0]
    grad = reduced_grad(param)  # DDP's main_grad, its ZeRO-2 shard piece, or .grad
    if grad is None:
        if param.grad is None:  # e.g. no backward reached it; the peer still expects our contribution
            param.grad = torch.zeros_like(param)
        grad = param.grad
    collectives.all_reduce(grad, group=groups.embd)


def _sum_local(params: list[nn.Parameter]) -> None:
    """Both copies on one rank (ZB-V): each gets their sum. Under the distributed optimizer each copy has
    a bucket of its own (param_and_grad_buffer.py), so their ZeRO-2 shard pieces cover the same elements."""
    grads = []
    for param in params:
        grad = reduced_grad(param)
        if grad is None:
            param.grad = torch.zeros_like(param)
            grad = param.grad
        grads.append(grad)
    total = grads[0] + grads[1]
    for grad in grads:
        grad.copy_(total)
