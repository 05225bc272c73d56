"""Contiguous gradient (and, for the distributed optimizer, parameter) buffers split into buckets.

Why contiguous: one collective per bucket instead of one per parameter, and the distributed optimizer
can own a plain [start, end) slice of each bucket. Parameters are laid out in *reverse* registration
order because backward produces gradients roughly from the last layer to the first, so the first
bucket to fill is the first one reduced (this is what makes --overlap-grad-reduce overlap anything).

Each bucket is padded to a multiple of the data-parallel size so reduce-scatter / all-gather split it
into equal shards; the padding is zero and belongs to no parameter.

ZeRO-2 (`shard_grads`, --data-parallel-sharding-strategy optim_grads): each bucket owns its full-size
gradient tensor only while gradients accumulate into it. It is allocated when the bucket's first gradient
of a step arrives, reduce-scattered into the bucket's persistent `grad_shard` (1/DP of it) once the last
micro-batch's gradients are in, and freed when that reduce-scatter completes; `param.main_grad` then goes
away and `param.main_grad_shard` (this rank's flat piece of the parameter's reduced gradient, possibly
empty, starting at flat element `param.main_grad_shard_start`) takes its place. Accumulation rule (Megatron-FSDP's, not DeepSpeed's): a bucket keeps its full
gradient until the last micro-batch, so a step communicates exactly what ZeRO-1 does (one reduce-scatter
per bucket, whatever the number of micro-batches) and the transient peak is the full gradient buffer; at
rest (optimizer step, between steps) only the shards remain. DeepSpeed's rule (reduce-scatter every
micro-batch into the shard) would bound the transient to the buckets in flight but multiply the
reduce-scatter volume by the number of micro-batches.

ZeRO-3 (`shard_params`, --data-parallel-sharding-strategy optim_grads_params): gradients as in ZeRO-2, and
each bucket (one ZeRO-3 unit, distributed/zero3.py) also owns its parameters as a persistent 1/DP
`param_shard` plus a full-size `param_data` of its own whose storage exists only while the unit is gathered
(`gather_bucket`: storage re-allocated, shards all-gathered into it; `release_bucket`: storage resized to 0).
The parameters stay views of `param_data` throughout, so autograd's saved references to them see the
re-gathered values in backward (PyTorch FSDP's flat-parameter technique).

Deferred initialisation: a parameter still on the meta device (a model built there, with the `init_args`
GPTModel records) gets its storage here, on `device`, keeping its Parameter object (torch.utils.swap_tensors,
so the module, tied uses and the metadata attributes stay valid). Under ZeRO-3 only this rank's shard of
it is ever drawn (tensor_parallel.utils.initialize_param_range): the full bucket never exists at build time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_lite import collectives
from megatron_lite.tensor_parallel.utils import initialize_param_range


@dataclass
class Bucket:
    """A contiguous slice [offset, offset + numel) of a buffer and the parameters that live in it."""
    params: list[torch.nn.Parameter]
    offset: int
    numel: int  # padded to a multiple of the DP size
    grad_data: torch.Tensor
    param_data: Optional[torch.Tensor]  # only with the distributed optimizer
    grad_shard: Optional[torch.Tensor] = None  # ZeRO-2: this rank's reduced shard (persistent)
    params_with_grad: set = field(default_factory=set)  # ids of params whose last-microbatch grad is in
    grad_handle: Optional[object] = None
    param_handle: Optional[object] = None
    param_shard: Optional[torch.Tensor] = None  # ZeRO-3: this rank's slice of the parameters (persistent)

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
                 use_distributed_optimizer: bool, gradient_scaling_factor: float, shard_grads: bool = False,
                 unit_of: Optional[dict[int, int]] = None, device: Optional[torch.device] = None):
        """`unit_of` (ZeRO-3): {id(param): unit index}; given, parameters are sharded at rest and every
        bucket holds exactly one unit's parameters (the bucket size does not apply). `device`: where the
        buffers live (default: the parameters' device); meta parameters are initialised there (module
        docstring; without the distributed optimizer DDP materialises them before)."""
        if shard_grads and not use_distributed_optimizer:
            raise ValueError("ParamAndGradBuffer: shard_grads (ZeRO-2) needs use_distributed_optimizer")
        self.shard_params = unit_of is not None
        if self.shard_params and not shard_grads:
            raise ValueError("ParamAndGradBuffer: sharded parameters (ZeRO-3) need shard_grads")
        self.shard_grads = shard_grads
        self.device = device if device is not None else _device(params)
        self.peak_grad_bytes = 0  # the most gradient storage this buffer has held at once
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
            new_unit = self.shard_params and bucket_params and unit_of[id(bucket_params[-1])] != unit_of[id(param)]
            if (own_bucket or new_unit) and bucket_params:
                close_bucket()
            self.param_index[id(param)] = (offset, offset + param.numel())
            offset += param.numel()
            bucket_params.append(param)
            if own_bucket or (not self.shard_params and bucket_size is not None and offset - bucket_start >= bucket_size):
                close_bucket()
        if bucket_params:
            close_bucket()
        self.numel = offset

        # ZeRO-2 has no buffer-wide gradient: each bucket allocates its own while it accumulates.
        self.grad_data = None if shard_grads else torch.zeros(self.numel, dtype=grad_dtype, device=self.device)
        self.param_data = None
        if use_distributed_optimizer and not self.shard_params:
            self.param_data = torch.zeros(self.numel, dtype=param_dtype, device=self.device)
        for param in self.params:
            start, end = self.param_index[id(param)]
            if self.param_data is not None:
                _fill(param, self.param_data[start:end], 0, param.numel())
                _point_at(param, self.param_data[start:end].view(param.shape))
            if self.grad_data is not None:
                param.main_grad = self.grad_data[start:end].view(param.shape)

        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, Bucket] = {}
        for bucket_params, start, numel in bucket_plan:
            bucket = Bucket(bucket_params, start, numel,
                            None if self.grad_data is None else self.grad_data[start:start + numel],
                            None if self.param_data is None else self.param_data[start:start + numel])
            if shard_grads:
                bucket.grad_shard = torch.zeros(numel // dp_size, dtype=grad_dtype, device=self.device)
            self.buckets.append(bucket)
            for param in bucket_params:
                self.bucket_of[id(param)] = bucket
            if self.shard_params:
                self._shard_bucket_params(bucket)
        self._note_grad_bytes()

    # ---- ZeRO-3: parameters sharded at rest ------------------------------------------------------
    def _shard_bucket_params(self, bucket: Bucket) -> None:
        """Give the bucket its own full-size parameter tensor (so it can be freed alone), without storage
        (allocated only while gathered), and this rank's shard: copied from parameters that exist, drawn for
        deferred (meta) ones, so the bucket's full parameters are never built."""
        shard_start, shard_end = bucket.shard_range(self.dp_rank, self.dp_size)
        bucket.param_shard = torch.zeros(shard_end - shard_start, dtype=self.param_dtype, device=self.device)
        for param in bucket.params:
            start, end = (i - bucket.offset for i in self.param_index[id(param)])
            lo, hi = max(start, shard_start), min(end, shard_end)
            if lo < hi:
                _fill(param, bucket.param_shard[lo - shard_start:hi - shard_start], lo - start, hi - start)
        # Views need storage of full size when made: torch.empty's untouched host pages cost no memory, and
        # the storage is freed right after (a device's caching allocator keeps one unit's worth reserved).
        bucket.param_data = torch.empty(bucket.numel, dtype=self.param_dtype, device=self.device)
        for param in bucket.params:
            start, end = (i - bucket.offset for i in self.param_index[id(param)])
            _point_at(param, bucket.param_data[start:end].view(param.shape))
        bucket.param_data.untyped_storage().resize_(0)

    def gather_bucket(self, bucket: Bucket, async_op: bool) -> None:
        """Re-allocate the bucket's full parameters and all-gather every rank's shard into them."""
        storage = bucket.param_data.untyped_storage()
        storage.resize_(bucket.numel * bucket.param_data.element_size())
        bucket.param_handle = collectives.all_gather_into_tensor(bucket.param_data, bucket.param_shard,
                                                                 group=self.dp_group, async_op=True)
        if not async_op:
            self.finish_bucket_param_sync(bucket)

    def release_bucket(self, bucket: Bucket) -> None:
        """Free the bucket's full parameters (after any gather in flight); the shard stays."""
        self.finish_bucket_param_sync(bucket)
        bucket.param_data.untyped_storage().resize_(0)

    @staticmethod
    def bucket_is_gathered(bucket: Bucket) -> bool:
        return bucket.param_data.untyped_storage().nbytes() > 0

    def keep_gathered_shards(self, bucket: Bucket) -> None:
        """Copy this rank's part of the (gathered, possibly overwritten: a checkpoint load) full parameters
        into the shard, so the shard stays the parameters' only persistent copy."""
        start, end = bucket.shard_range(self.dp_rank, self.dp_size)
        bucket.param_shard.copy_(bucket.param_data[start:end])

    def param_shard_view(self, param: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
        """ZeRO-3: the persistent shard's view of param's flat [start, end) (which this rank owns)."""
        bucket = self.bucket_of[id(param)]
        param_start, _ = self.param_index[id(param)]
        shard_start, shard_end = bucket.shard_range(self.dp_rank, self.dp_size)
        lo, hi = param_start - bucket.offset + start - shard_start, param_start - bucket.offset + end - shard_start
        if lo < 0 or hi > shard_end - shard_start:
            raise ValueError(f"flat [{start}, {end}) of a parameter is not in DP rank {self.dp_rank}'s shard")
        return bucket.param_shard[lo:hi]

    def param_bytes(self) -> int:
        """Parameter storage held now: ZeRO-3's shards plus the buckets gathered at this moment."""
        element = torch.empty((), dtype=self.param_dtype).element_size()
        if not self.shard_params:
            return sum(p.numel() for p in self.params) * element
        live = sum(b.numel for b in self.buckets if self.bucket_is_gathered(b))
        return (sum(b.param_shard.numel() for b in self.buckets) + live) * element

    # ---- gradient storage ------------------------------------------------------------------------
    def main_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full-size gradient accumulator of `param` (ZeRO-2: allocates its bucket's on first use)."""
        bucket = self.bucket_of[id(param)]
        if bucket.grad_data is None:
            self._materialize(bucket)
        return param.main_grad

    def _materialize(self, bucket: Bucket) -> None:
        bucket.grad_data = torch.zeros(bucket.numel, dtype=self.grad_dtype, device=self.device)
        for param in bucket.params:
            start, end = self.param_index[id(param)]
            param.main_grad = bucket.grad_data[start - bucket.offset:end - bucket.offset].view(param.shape)
            param.main_grad_shard = None
        self._note_grad_bytes()

    def _release(self, bucket: Bucket) -> None:
        """ZeRO-2, after the bucket's reduce-scatter: free the full gradient, point params at their shard piece."""
        shard_start, shard_end = bucket.shard_range(self.dp_rank, self.dp_size)
        shard_start, shard_end = shard_start + bucket.offset, shard_end + bucket.offset
        bucket.grad_data = None
        for param in bucket.params:
            start, end = self.param_index[id(param)]
            lo, hi = max(start, shard_start), min(end, shard_end)
            lo, hi = (lo, hi) if lo < hi else (shard_start, shard_start)
            param.main_grad = None
            param.main_grad_shard = bucket.grad_shard[lo - shard_start:hi - shard_start]
            param.main_grad_shard_start = lo - start  # where the piece starts in the flat parameter

    def shard_grad(self, bucket: Bucket) -> torch.Tensor:
        """This rank's reduced shard of the bucket's gradient (a view into the full bucket under ZeRO-1)."""
        if self.shard_grads:
            return bucket.grad_shard
        start, end = bucket.shard_range(self.dp_rank, self.dp_size)
        return bucket.grad_data[start:end]

    def grad_bytes(self) -> int:
        """Gradient storage held now: the whole buffer, or (ZeRO-2) the live bucket buffers plus the shards."""
        if not self.shard_grads:
            return self.grad_data.numel() * self.grad_data.element_size()
        tensors = [b.grad_shard for b in self.buckets] + [b.grad_data for b in self.buckets if b.grad_data is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def full_grad_bytes(self) -> int:
        """Bytes of the full (padded) gradient of this buffer: what one reduction of it moves."""
        return self.numel * torch.empty((), dtype=self.grad_dtype).element_size()

    def _note_grad_bytes(self) -> None:
        self.peak_grad_bytes = max(self.peak_grad_bytes, self.grad_bytes())

    # ---- gradient reduction ----------------------------------------------------------------------
    def start_bucket_grad_sync(self, bucket: Bucket, async_op: bool) -> None:
        """Average the bucket's gradients over DP: all-reduce, or reduce-scatter into this rank's shard."""
        if bucket.grad_handle is not None:
            return
        if bucket.grad_data is None:  # ZeRO-2: no gradient reached this bucket on this rank; it still takes part
            self._materialize(bucket)
        if self.gradient_scaling_factor != 1.0:
            bucket.grad_data.mul_(self.gradient_scaling_factor)  # pre-divide: the sum is then the mean
        if self.shard_grads:  # the shard is separate storage: reduce straight into it, free the bucket after
            work = collectives.reduce_scatter_tensor(bucket.grad_shard, bucket.grad_data, group=self.dp_group,
                                                     async_op=True)
            bucket.grad_handle = _CopyOnWait(work, None, None, on_done=lambda: self._release(bucket))
        elif self.use_distributed_optimizer:
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

    def register_grad_ready(self, param: torch.nn.Parameter, overlap: bool, async_op: bool = True) -> None:
        """Called from the backward hook of the last micro-batch: start a bucket once it is complete
        (`overlap`), asynchronously or, with async_op False, waiting for it (ZeRO-3 without overlap)."""
        bucket = self.bucket_of[id(param)]
        bucket.params_with_grad.add(id(param))
        if overlap and len(bucket.params_with_grad) == len(bucket.params):
            self.start_bucket_grad_sync(bucket, async_op=async_op)

    def reset(self) -> None:
        if self.grad_data is not None:
            self.grad_data.zero_()
        for bucket in self.buckets:
            if self.shard_grads:
                bucket.grad_data = None
                bucket.grad_shard.zero_()
                for param in bucket.params:
                    param.main_grad = param.main_grad_shard = None
            bucket.params_with_grad.clear()
            bucket.grad_handle = None

    # ---- parameter all-gather (distributed optimizer) --------------------------------------------
    def start_param_sync(self, async_op: bool) -> None:
        if self.shard_params:  # ZeRO-3 gathers each unit when it is used (distributed/zero3.py)
            return
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
    """An async handle that, once the collective is done, copies a scratch result into its destination
    (when given) and runs `on_done` (when given)."""

    def __init__(self, work, destination: Optional[torch.Tensor], scratch: Optional[torch.Tensor], on_done=None):
        self.work, self.destination, self.scratch, self.on_done = work, destination, scratch, on_done

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            if self.destination is not None:
                self.destination.copy_(self.scratch)
            if self.on_done is not None:
                self.on_done()
            self.work = None


def _fill(param: torch.nn.Parameter, out: torch.Tensor, start: int, end: int) -> None:
    """out = param's flat [start, end): copied, or drawn when param is deferred (meta, `out` real)."""
    if not param.is_meta:
        out.copy_(param.detach().reshape(-1)[start:end])
    elif not out.is_meta:
        initialize_param_range(param, out, start, end)


def _point_at(param: torch.nn.Parameter, view: torch.Tensor) -> None:
    """Make `view` param's data; a meta parameter keeps its object (module docstring)."""
    if param.is_meta and not view.is_meta:
        materialize(param, view)
    else:
        param.data = view


def materialize(param: torch.nn.Parameter, data: torch.Tensor) -> None:
    """Give a meta parameter the real tensor `data` as storage, keeping the Parameter object (modules and
    optimizers hold it) and its attributes (ShardSpec, init and grad-sync metadata)."""
    real = torch.nn.Parameter(torch.empty(0, dtype=data.dtype, device=data.device), requires_grad=param.requires_grad)
    real.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, real)
    # Through .data, as for a parameter built real: its version counter stays its own, so ZeRO-3's
    # all-gathers into the bucket do not read as in-place changes of tensors autograd saved.
    param.data = data


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _device(params: list[torch.nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")
