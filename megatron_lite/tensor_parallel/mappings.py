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
With one TP rank every mapping is the identity: the public functions return their input untouched
(no autograd node, no collective, no group needed).
All communication goes through megatron_lite.collectives.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from megatron_lite import collectives, parallel_state


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def _identity_without_tp(mapping: Callable) -> Callable:
    """With one TP rank a mapping returns its input itself: no autograd node, no group needed."""
    @functools.wraps(mapping)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        return x if _tp_size() == 1 else mapping(x, *args, **kwargs)
    return wrapper


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size() == 1:
        return x
    out = x.contiguous().clone()  # the input may be saved for backward elsewhere: never reduce it in place
    collectives.all_reduce(out, parallel_state.get_tensor_model_parallel_group())
    return out


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    size = _tp_size()
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {size} tensor-parallel ranks")
    return torch.chunk(x, size, dim=dim)[parallel_state.get_tensor_model_parallel_rank()].contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    if _tp_size() == 1:
        return x
    return collectives.all_gather(x.contiguous(), parallel_state.get_tensor_model_parallel_group(), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    if _tp_size() == 1:
        return x
    return collectives.reduce_scatter(x.contiguous(), parallel_state.get_tensor_model_parallel_group(), dim=dim)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1)


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0)


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad: bool):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather(x, 0)

    @staticmethod
    def backward(ctx, grad):
        # The consumer is TP-split (a column-parallel matmul): each rank holds a partial grad of the
        # full sequence, so sum them and keep this rank's part. Otherwise the grads are already equal.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter(grad, 0), None
        return _split(grad, 0), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0)


@_identity_without_tp
def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToRegion.apply(x)


@_identity_without_tp
def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromRegion.apply(x)


@_identity_without_tp
def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToRegion.apply(x)


@_identity_without_tp
def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _GatherFromRegion.apply(x)


@_identity_without_tp
def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToSequence.apply(x)


@_identity_without_tp
def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    return _GatherFromSequence.apply(x, tensor_parallel_output_grad)


@_identity_without_tp
def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceScatterToSequence.apply(x)
