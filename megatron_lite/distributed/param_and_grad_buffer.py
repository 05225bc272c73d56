"""Contiguous gradient (and, for the distributed optimizer, parameter) buffers split into buckets.

Why contiguous: one collective per bucket instead of one per parameter, and the distributed optimizer
can own a plain [start, end) slice of each bucket. Parameters are laid out in *reverse* registration
order because backward produces gradients roughly from the last layer to the first, so the first
bucket to fill is the first one reduced (this is what makes --overlap-grad-reduce overlap anything).

Each bucket is padded to a multiple of the data-parallel size so reduce-scatter / all-gather split it
into equal shards; the padding is zero and belongs to no parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_lite import collectives


@dataclass
class Bucket:
    """A contiguous slice [offset, offset + numel) of a buffer and the parameters that live in it."""
    params: list[torch.nn.Parameter]
    offset: int
    numel: int  # padded to a multiple of the DP size
    grad_data: torch.Tensor
    param_data: Optional[torch.Tensor]  # only with the distributed optimizer
    params_with_grad: set = field(default_factory=set)  # ids of params whose last-microbatch grad is in
    grad_handle: Optional[object] = None
    param_handle: Optional[object] = None

    def shard_range(self, dp_rank: int, dp_size: int) -> tuple[int, int]:
        """This DP rank's [start, end) within the bucket (bucket-local element indices)."""
        size = self.numel // dp_size
        return dp_rank * size, (dp_rank + 1) * size


class ParamAndGradBuffer:
    """All parameters of one (param dtype, grad dtype) pair in one model chunk.

    `param.main_grad` becomes a view into `grad_data`; with `use_distributed_optimizer`, `param.data`
    becomes a view into `param_data` so the parameter all-gather writes straight into the model.
    """

    def __init__(self, params: list[torch.nn.Parameter], param_dtype: torch.dtype, grad_dtype: torch.dtype,
                 bucket_size: Optional[int], dp_group, dp_size: int, dp_rank: int,
                 use_distributed_optimizer: bool, gradient_scaling_factor: float):
        self.param_dtype, self.grad_dtype = param_dtype, grad_dtype
        self.dp_group, self.dp_size, self.dp_rank = dp_group, dp_size, dp_rank
        self.use_distributed_optimizer = use_distributed_optimizer
        self.gradient_scaling_factor = gradient_scaling_factor
        self.params = list(reversed(params))  # backward order

        # Plan the layout: (param, start) and bucket boundaries, before allocating anything.
        self.param_index: dict[int, tuple[int, int]] = {}  # id(param) -> (start, end) in the buffer
        bucket_plan: list[tuple[list, int, int]] = []  # (params, offset, padded numel)
        offset, bucket_start, bucket_params = 0, 0, []

        def close_bucket() -> None:
            nonlocal offset, bucket_start, bucket_params
            padded = _round_up(offset - bucket_start, dp_size) if use_distributed_optimizer else offset - bucket_start
            bucket_plan.append((bucket_params, bucket_start, padded))
            offset = bucket_start + padded
            bucket_start, bucket_params = offset, []

        for param in self.params:
            # With the distributed optimizer the tied embedding gets a bucket of its own: then its DP shards
            # cover the same elements on the first and the last stage, so the embedding-group all-reduce
            # that follows the reduce-scatter adds matching shards (Megatron-core does the same).
            own_bucket = use_distributed_optimizer and getattr(param, "shared_embedding", False)
            if own_bucket and bucket_params:
                close_bucket()
            self.param_index[id(param)] = (offset, offset + param.numel())
            offset += param.numel()
            bucket_params.append(param)
            if own_bucket or (bucket_size is not None and offset - bucket_start >= bucket_size):
                close_bucket()
        if bucket_params:
            close_bucket()
        self.numel = offset

        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=_device(params))
        self.param_data = None
        if use_distributed_optimizer:
            self.param_data = torch.zeros(self.numel, dtype=param_dtype, device=_device(params))
        for param in self.params:
            start, end = self.param_index[id(param)]
            if self.param_data is not None:
                self.param_data[start:end].view(param.shape).copy_(param.data)
                param.data = self.param_data[start:end].view(param.shape)
            param.main_grad = self.grad_data[start:end].view(param.shape)

        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, Bucket] = {}
        for bucket_params, start, numel in bucket_plan:
            bucket = Bucket(bucket_params, start, numel, self.grad_data[start:start + numel],
                            None if self.param_data is None else self.param_data[start:start + numel])
            self.buckets.append(bucket)
            for param in bucket_params:
                self.bucket_of[id(param)] = bucket

    # ---- gradient reduction ----------------------------------------------------------------------
    def start_bucket_grad_sync(self, bucket: Bucket, async_op: bool) -> None:
        """Average the bucket's gradients over DP: all-reduce, or reduce-scatter into this rank's shard."""
        if bucket.grad_handle is not None:
            return
        if self.gradient_scaling_factor != 1.0:
            bucket.grad_data.mul_(self.gradient_scaling_factor)  # pre-divide: the sum is then the mean
        if self.use_distributed_optimizer:
            start, end = bucket.shard_range(self.dp_rank, self.dp_size)
            # The shard is a view of the input; reduce into a scratch tensor and copy on completion so
            # no backend has to handle aliased input/output.
            scratch = torch.empty(end - start, dtype=bucket.grad_data.dtype, device=bucket.grad_data.device)
            work = collectives.reduce_scatter_tensor(scratch, bucket.grad_data, group=self.dp_group, async_op=True)
            bucket.grad_handle = _CopyOnWait(work, bucket.grad_data[start:end], scratch)
        else:
            bucket.grad_handle = collectives.all_reduce(bucket.grad_data, group=self.dp_group, async_op=True)
        if not async_op:
            bucket.grad_handle.wait()

    def finish_grad_sync(self) -> None:
        for bucket in self.buckets:
            self.start_bucket_grad_sync(bucket, async_op=True)  # any bucket not started by the hooks
        for bucket in self.buckets:
            bucket.grad_handle.wait()

    def register_grad_ready(self, param: torch.nn.Parameter, overlap: bool) -> None:
        """Called from the backward hook of the last micro-batch: start a bucket once it is complete."""
        bucket = self.bucket_of[id(param)]
        bucket.params_with_grad.add(id(param))
        if overlap and len(bucket.params_with_grad) == len(bucket.params):
            self.start_bucket_grad_sync(bucket, async_op=True)

    def reset(self) -> None:
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.params_with_grad.clear()
            bucket.grad_handle = None

    # ---- parameter all-gather (distributed optimizer) --------------------------------------------
    def start_param_sync(self, async_op: bool) -> None:
        for bucket in self.buckets:
            start, end = bucket.shard_range(self.dp_rank, self.dp_size)
            shard = bucket.param_data[start:end].clone()  # input must not alias the output
            bucket.param_handle = collectives.all_gather_into_tensor(bucket.param_data, shard, group=self.dp_group,
                                                                     async_op=True)
            if not async_op:
                self.finish_bucket_param_sync(bucket)

    @staticmethod
    def finish_bucket_param_sync(bucket: Bucket) -> None:
        if bucket.param_handle is not None:
            bucket.param_handle.wait()
            bucket.param_handle = None


class _CopyOnWait:
    """An async handle that copies a scratch result into its destination once the collective is done."""

    def __init__(self, work, destination: torch.Tensor, scratch: torch.Tensor):
        self.work, self.destination, self.scratch = work, destination, scratch

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.destination.copy_(self.scratch)
            self.work = None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _device(params: list[torch.nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")
