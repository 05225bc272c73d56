"""Data parallelism for one model chunk: contiguous grad buffers, buckets, reduction overlapped with backward.

Life of a gradient (Megatron-core's DistributedDataParallel):
1. autograd accumulates into `param.grad`; our post-accumulate hook adds it into `param.main_grad` (a view
   of the contiguous grad buffer, fp32 with --bf16 / --accumulate-allreduce-grads-in-fp32) and frees
   `param.grad`, so the buffer is the only gradient storage;
2. inside `no_sync()` (every micro-batch but the last) that is all that happens;
3. on the last micro-batch each hook marks its parameter ready; with --overlap-grad-reduce a bucket's
   all-reduce (or reduce-scatter, with the distributed optimizer) starts asynchronously as soon as all
   its parameters are ready, while backward continues on earlier layers;
4. `finish_grad_sync()` (from finalize_model_grads) starts whatever has not started and waits for all.
Under ZeRO-2 (--data-parallel-sharding-strategy optim_grads) each bucket's full gradient exists only from
its first gradient of a step to its reduce-scatter; afterwards each rank holds its shard (see
param_and_grad_buffer.py for the accumulation rule and its cost).
Under ZeRO-3 (optim_grads_params) parameters are sharded at rest too: each unit of the model's
sharding_plan() is one bucket, gathered around its forward and backward by distributed/zero3.py.
Gradients are pre-multiplied by 1/(DP x CP) so the summing collective yields the mean.

Deferred initialisation (`init_device`): a model built on the meta device (GPTModel records each
parameter's `init_args`) is initialised here, on `init_device`: under ZeRO-3 each rank draws and keeps only
its shard (param_and_grad_buffer.py), so no rank ever holds the full model; otherwise each parameter is
drawn into its place. The values are those of the same model built on a real device.
"""
from __future__ import annotations

import weakref

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.distributed.model_chunk import ModelChunk
from megatron_lite.distributed.param_and_grad_buffer import ParamAndGradBuffer, materialize
from megatron_lite.distributed.zero3 import ShardedParams, build_units, default_plan, unit_params
from megatron_lite.process_groups import ProcessGroups
from megatron_lite.tensor_parallel.utils import initialize_param_range


def default_bucket_size(dp_size: int) -> int:
    """Megatron's default: large buckets, growing with DP so each rank's chunk stays efficient."""
    return max(40_000_000, 1_000_000 * dp_size)


class DistributedDataParallel(ModelChunk):
    """Wraps ONE model chunk (the ModelChunk interface, model_chunk.py). Keys of state_dict() are the
    module's own (global) parameter names. `groups` (default: one process) gives the data-parallel group."""

    def __init__(self, config: Config, module: nn.Module, disable_bucketing: bool = False,
                 groups: Optional[ProcessGroups] = None, init_device: Optional[torch.device] = None):
        """`init_device`: where the parameters (and buffers) of a module built on the meta device are
        created and initialised (module docstring); None leaves a meta module shape-only (planning)."""
        super().__init__(module)
        self.config = config
        parallel = config.parallel
        self.overlap_grad_reduce = parallel.overlap_grad_reduce
        self.use_distributed_optimizer = parallel.sharding_strategy != "no_shard"
        self.shard_grads = parallel.shards_grads  # ZeRO-2 (param_and_grad_buffer.py)
        self.shard_params = parallel.sharding_strategy == "optim_grads_params"  # ZeRO-3 (zero3.py)
        self.overlap_param_gather = parallel.overlap_param_gather and self.use_distributed_optimizer

        # CP ranks see different tokens of the same samples, so their grads are averaged like DP's.
        groups = groups or ProcessGroups.single()
        expected = config.data_parallel_size * parallel.context_parallel_size
        if groups.dp_cp.size != expected:
            raise ConfigError(f"DistributedDataParallel: the config gives DP x CP = {expected} but the process groups "
                              f"have {groups.dp_cp.size} data-parallel ranks. Pass groups=parallel_state.get_process_groups().")
        self.dp_group = groups.dp_cp
        self.dp_size, self.dp_rank = groups.dp_cp.size, groups.dp_cp.rank
        bucket_size = None if disable_bucketing else (parallel.ddp_bucket_size or default_bucket_size(self.dp_size))

        # ZeRO-3: the parameters in unit order (each unit contiguous, so one bucket), else module order.
        plan = (module.sharding_plan() if hasattr(module, "sharding_plan") else default_plan(module)) \
            if self.shard_params else None
        by_unit = unit_params(plan[0], module) if plan else {"": [p for p in module.parameters() if p.requires_grad]}
        unit_of = {id(p): index for index, params in enumerate(by_unit.values()) for p in params} if plan else None
        # One buffer per (param dtype, grad dtype, expert or not): bf16 params always accumulate grads in fp32.
        # MoE experts (param.expert_parallel) are replicated only over the expert-data-parallel group, so their
        # buffers reduce (and the distributed optimizer shards) over it; the factor stays 1/(DP x CP) because
        # the token dispatcher already summed the gradients of the EP ranks' tokens.
        by_dtype: dict[tuple[torch.dtype, torch.dtype, bool], list[nn.Parameter]] = {}
        for param in (p for params in by_unit.values() for p in params):
            fp32_grads = parallel.accumulate_allreduce_grads_in_fp32 or param.dtype == torch.bfloat16
            grad_dtype = torch.float32 if fp32_grads else param.dtype
            by_dtype.setdefault((param.dtype, grad_dtype, getattr(param, "expert_parallel", False)), []).append(param)
        if init_device is not None and not self.use_distributed_optimizer:
            _materialize_all(module, init_device)  # no parameter buffer to draw into: each in its own place
        self._buffers: list[ParamAndGradBuffer] = []
        for (param_dtype, grad_dtype, expert), params in by_dtype.items():
            group = groups.expert_dp if expert else self.dp_group
            self._buffers.append(ParamAndGradBuffer(
                params, param_dtype, grad_dtype, bucket_size, group, group.size, group.rank,
                self.use_distributed_optimizer, 1.0 / self.dp_size, self.shard_grads, unit_of, device=init_device))
        if init_device is not None:
            _materialize_all(module, init_device)  # what no buffer holds: frozen parameters, module buffers
        self.buffer_of: dict[int, ParamAndGradBuffer] = {
            id(p): buffer for buffer in self._buffers for p in buffer.params}
        self.zero3: Optional[ShardedParams] = None
        if plan:
            self.zero3 = ShardedParams(module, build_units(by_unit, self.buffer_of), plan[1],
                                       prefetch=self.overlap_param_gather)

        self.is_last_microbatch = True
        self._hook_handles = []
        for param in module.parameters():
            if param.requires_grad:
                self._hook_handles.append(param.register_post_accumulate_grad_hook(self._make_grad_hook()))
        if self.overlap_param_gather and not self.shard_params:
            # Wait for a module's freshly gathered parameters just before it runs forward.
            for submodule in module.modules():
                if any(True for _ in submodule.parameters(recurse=False)):
                    self._hook_handles.append(submodule.register_forward_pre_hook(self._param_gather_pre_hook))

    # ---- hooks -----------------------------------------------------------------------------------
    def _make_grad_hook(self):
        # A weak reference: autograd keeps tensor hooks in C++, where Python's cycle collector cannot see
        # them, so a hook holding `self` would keep this DDP (its buffers, its process groups' threads)
        # alive after the model is dropped.
        ddp = weakref.ref(self)

        def hook(param: nn.Parameter) -> None:
            self = ddp()
            if self is None:
                return
            buffer = self.buffer_of[id(param)]
            if buffer.bucket_of[id(param)].grad_handle is not None:
                raise RuntimeError("a gradient arrived after its bucket's data-parallel reduction started: run every "
                                   "micro-batch but the last under ddp.no_sync(), and zero_grad_buffer() between steps")
            if param.grad is not None:
                buffer.main_grad(param).add_(param.grad)
                param.grad = None  # the buffer is the only copy: halves gradient memory
            if self.is_last_microbatch:  # ZeRO-3 always reduce-scatters a unit once its gradient is complete
                buffer.register_grad_ready(param, self.overlap_grad_reduce or self.shard_params,
                                           async_op=self.overlap_grad_reduce)
        return hook

    def _param_gather_pre_hook(self, submodule: nn.Module, args) -> None:
        for param in submodule.parameters(recurse=False):
            buffer = self.buffer_of.get(id(param))
            if buffer is not None:
                buffer.finish_bucket_param_sync(buffer.bucket_of[id(param)])

    # ---- the ModelChunk interface (Megatron's DDP) --------------------------------------------------
    @property
    def param_and_grad_buffers(self) -> list[ParamAndGradBuffer]:
        return self._buffers

    @property
    def shards_optimizer_state(self) -> bool:
        return self.use_distributed_optimizer

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients of the micro-batches run inside only accumulate; no communication."""
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def start_grad_sync(self) -> None:
        """Start every bucket's reduction now (asynchronously); finish_grad_sync waits for them."""
        for buffer in self.param_and_grad_buffers:
            for bucket in buffer.buckets:
                buffer.start_bucket_grad_sync(bucket, async_op=True)

    def finish_grad_sync(self) -> None:
        for buffer in self.param_and_grad_buffers:
            buffer.finish_grad_sync()

    def zero_grad_buffer(self) -> None:
        for param in self.module.parameters():
            param.grad = None
        for buffer in self.param_and_grad_buffers:
            buffer.reset()

    def start_param_sync(self, force_sync: bool = False) -> None:
        """All-gather the parameter shards the distributed optimizer updated. With --overlap-param-gather
        (and not force_sync) the gathers run asynchronously and each module waits for its own in forward."""
        if not self.use_distributed_optimizer:
            return
        for buffer in self.param_and_grad_buffers:
            buffer.start_param_sync(async_op=self.overlap_param_gather and not force_sync)

    def finish_param_sync(self) -> None:
        """Parameters final and at rest (ZeRO-3: any state-dict gather written back to the shards and freed)."""
        if self.zero3 is not None:
            self.zero3.settle()
            return
        for buffer in self.param_and_grad_buffers:
            for bucket in buffer.buckets:
                buffer.finish_bucket_param_sync(bucket)

    def param_slice(self, param: nn.Parameter, start: int, end: int):
        if self.zero3 is not None:  # the persistent shard: the full parameter exists only while gathered
            return self.buffer_of[id(param)].param_shard_view(param, start, end)
        return super().param_slice(param, start, end)

    # ZeRO-3: a state dict reads or writes whole parameters, so every unit is gathered first (freed again,
    # with any loaded values kept in the shards, by the next forward, optimizer step or finish_param_sync:
    # read or write the parameters sharded_state() returns before then).
    def sharded_state(self) -> dict[str, nn.Parameter]:
        if self.zero3 is None:
            return super().sharded_state()
        self.zero3.materialize()
        return dict(self.module.named_parameters())

    def state_dict(self, *args, **kwargs):
        if self.zero3 is None:
            return super().state_dict(*args, **kwargs)
        self.zero3.materialize()
        # copies: the gathered storage is freed right away, and the dict must outlive it
        state = {k: v.clone() for k, v in self.module.state_dict(*args, **kwargs).items()}
        self.zero3.settle()
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.zero3 is not None:
            self.zero3.materialize()
            return self.module.load_state_dict(state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _materialize_all(module: nn.Module, device: torch.device) -> None:
    """Give every meta parameter of `module` its own storage on `device`, drawn from its init_args, and
    every meta buffer zeros (GPTModel's buffers all start at zero)."""
    for param in module.parameters():
        if param.is_meta:
            data = torch.empty(param.numel(), dtype=param.dtype, device=device)
            initialize_param_range(param, data, 0, param.numel())
            materialize(param, data.view(param.shape))
    for owner in module.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and buffer.is_meta:
                owner._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
