"""Autograd functions that move activations in and out of the tensor-parallel region (Megatron's mappings).

Each forward collective has its conjugate in backward:
  copy_to      identity   / all-reduce        (entering a column-parallel layer)
  reduce_from  all-reduce / identity          (leaving a row-parallel layer)
  scatter_to   split last dim / all-gather last dim
  gather_from  all-gather last dim / split last dim
and along the sequence (dim 0 of [s, b, h]) for sequence parallelism:
  scatter_to_sequence_parallel     split / all-gather
  gather_from_sequence_parallel    all-gather / reduce-scatter (or split)
  reduce_scatter_to_sequence_parallel  reduce-scatter / all-gather
Every mapping takes the TP group (`process_groups.Group`) it works over. With one TP rank every mapping
is the identity: the public functions return their input untouched (no autograd node, no collective).
All communication goes through megatron_lite.collectives.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from megatron_lite import collectives
from megatron_lite.process_groups import Group


def _identity_without_tp(mapping: Callable) -> Callable:
    """With one TP rank a mapping returns its input itself: no autograd node, no communication."""
    @functools.wraps(mapping)
    def wrapper(x: torch.Tensor, group: Group, *args, **kwargs):
        return x if group.size == 1 else mapping(x, group, *args, **kwargs)
    return wrapper


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    out = x.contiguous().clone()  # the input may be saved for backward elsewhere: never reduce it in place
    collectives.all_reduce(out, group)
    return out


def _split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    if x.shape[dim] % group.size != 0:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {group.size} tensor-parallel ranks")
    return torch.chunk(x, group.size, dim=dim)[group.rank].contiguous()


def _gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    return collectives.all_gather(x.contiguous(), group, dim=dim)


def _reduce_scatter(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    return collectives.reduce_scatter(x.contiguous(), group, dim=dim)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, -1), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, -1), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, 0), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad: bool):
        ctx.group, ctx.tensor_parallel_output_grad = group, tensor_parallel_output_grad
        return _gather(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        # The consumer is TP-split (a column-parallel matmul): each rank holds a partial grad of the
        # full sequence, so sum them and keep this rank's part. Otherwise the grads are already equal.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter(grad, ctx.group, 0), None, None
        return _split(grad, ctx.group, 0), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, 0), None


@_identity_without_tp
def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


@_identity_without_tp
def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


@_identity_without_tp
def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group)


@_identity_without_tp
def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromRegion.apply(x, group)


@_identity_without_tp
def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToSequence.apply(x, group)


@_identity_without_tp
def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    return _GatherFromSequence.apply(x, group, tensor_parallel_output_grad)


@_identity_without_tp
def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceScatterToSequence.apply(x, group)
