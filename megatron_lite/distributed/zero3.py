"""ZeRO-3 (--data-parallel-sharding-strategy optim_grads_params): parameters sharded at rest, gathered per unit.

Units and steps. A model chunk describes itself with `sharding_plan()` (GPTModel's: units = the embedding,
each transformer layer, the final norm with the output layer; steps = the modules that run in forward
order and the units each needs). A unit's parameters are one bucket of the DDP buffers (two when it holds
the tied embedding, whose shard must line up with its copy on the last stage), so its all-gather and its
gradient reduce-scatter are one collective each. A chunk without a plan is one unit and one step.

Lifetime of a unit's full parameters (param_and_grad_buffer.py holds the storage):
- forward: a step's pre-hook frees the gathered units it does not need, gathers its own (or waits for
  their prefetch) and, with --overlap-param-gather, starts the all-gather of the next step's units;
  a step's units stay gathered until the next step starts or the chunk's forward returns, so the last
  step also covers the output layer that GPTModel runs after the final norm;
- backward: a hook on the gradient of each step's output (of the chunk's output for the last step) does
  the same in reverse order, prefetching the previous step; the units a backward step needs are held
  until the next backward step starts, so activation recomputation (which re-runs a step's forward inside
  its backward) finds them gathered; recomputed steps are not prefetched into (their re-forward gathers
  what it needs); when the backward pass ends (an autograd engine callback) every unit is freed;
- each forward and each backward of every micro-batch gathers again (pipeline schedules interleave them).

Bound: at most MAX_GATHERED = 2 units are gathered at a time on a chunk: a step needs at most two (the tied
output layer on a single stage needs the embedding too) and a prefetch starts only when it keeps the count
at two. `peak_gathered` records the most seen; the tests also count live full-size storages directly.

Gradients are those of ZeRO-2 with one bucket per unit: a unit's gradient is reduce-scattered as soon as
its last micro-batch's backward completes it (asynchronously with --overlap-grad-reduce, else at once).
Communication per step with m micro-batches: parameters all-gathered 2m times (forward and backward) and
gradients reduce-scattered once: 1.5x plain DP's all-reduce when m = 1 and grads have the params' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from megatron_lite.tensor_parallel.random import in_checkpointed_forward

MAX_GATHERED = 2


@dataclass(eq=False)
class Unit:
    """The parameters gathered and freed together: (buffer, bucket) pairs."""
    name: str
    buckets: list = field(default_factory=list)

    def gather(self, async_op: bool) -> None:
        for buffer, bucket in self.buckets:
            buffer.gather_bucket(bucket, async_op)

    def wait(self) -> None:
        for buffer, bucket in self.buckets:
            buffer.finish_bucket_param_sync(bucket)

    def release(self) -> None:
        for buffer, bucket in self.buckets:
            buffer.release_bucket(bucket)

    def keep_gathered_shards(self) -> None:
        for buffer, bucket in self.buckets:
            buffer.keep_gathered_shards(bucket)


@dataclass(eq=False)
class Step:
    module: nn.Module
    units: list[Unit]
    recomputed: bool = False  # runs inside an activation-checkpointed region (its forward re-runs in backward)


def default_plan(module: nn.Module) -> tuple[dict[str, list[nn.Module]], list[tuple[nn.Module, tuple[str, ...]]]]:
    """A module without `sharding_plan()`: the whole module is one unit and one step."""
    return {"module": [module]}, [(module, ("module",))]


def unit_params(units: dict[str, list[nn.Module]], module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{unit name: its trainable parameters}; every trainable parameter of `module` in exactly one unit."""
    owner: dict[int, str] = {}
    params: dict[str, list[nn.Parameter]] = {name: [] for name in units}
    for name, modules in units.items():
        for sub in modules:
            for param in sub.parameters():
                if param.requires_grad and id(param) not in owner:
                    owner[id(param)] = name
                    params[name].append(param)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ValueError(f"ZeRO-3: parameters in no unit of the model's sharding_plan(): {missing}")
    return params


def build_units(by_unit: dict[str, list[nn.Parameter]], buffer_of: dict) -> dict[str, Unit]:
    """{unit name: Unit} over the (buffer, bucket) pairs holding each unit's parameters (DDP's buffer_of)."""
    units = {name: Unit(name) for name in by_unit}
    for name, params in by_unit.items():
        for param in params:
            buffer = buffer_of[id(param)]
            bucket = buffer.bucket_of[id(param)]
            if not any(bucket is b for _, b in units[name].buckets):
                units[name].buckets.append((buffer, bucket))
    return units


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ShardedParams:
    """Gathers and frees one chunk's units around its steps (module docstring)."""

    def __init__(self, module: nn.Module, units: dict[str, Unit], steps: list[tuple[nn.Module, tuple[str, ...]]],
                 prefetch: bool):
        self.module, self.prefetch = module, prefetch
        self.units = [u for u in units.values() if u.buckets]
        self.steps = [Step(m, [units[n] for n in names if units[n].buckets]) for m, names in steps]
        self.gathered: list[Unit] = []  # in gather order
        self.held: list[Unit] = []  # the current backward step's units
        self.backward_step: Optional[int] = None
        self.materialized = False  # every unit gathered for a state dict (checkpoint save / load)
        self.peak_gathered = 0
        self.handles = [module.register_forward_pre_hook(self._chunk_pre_forward),
                        module.register_forward_hook(self._chunk_post_forward)]
        for index, step in enumerate(self.steps):
            self.handles.append(step.module.register_forward_pre_hook(self._step_pre_hook(index)))
            self.handles.append(step.module.register_forward_hook(self._step_post_hook(index)))

    # ---- gather / free -------------------------------------------------------------------------------
    def _gather(self, unit: Unit, async_op: bool, count: bool = True) -> None:
        if unit in self.gathered:
            if not async_op:
                unit.wait()
            return
        unit.gather(async_op)
        self.gathered.append(unit)
        if count:  # (materialize() for a state dict is outside any step)
            self.peak_gathered = max(self.peak_gathered, len(self.gathered))

    def _release(self, unit: Unit) -> None:
        unit.release()
        self.gathered.remove(unit)

    def _enter(self, index: int, prefetch_index: Optional[int]) -> None:
        """Make step `index` runnable: free what it does not need (and is not held), gather what it needs,
        then prefetch step `prefetch_index`'s units if that keeps at most MAX_GATHERED gathered."""
        needs = self.steps[index].units
        for unit in list(self.gathered):
            if unit not in needs and unit not in self.held:
                self._release(unit)
        for unit in needs:
            self._gather(unit, async_op=False)
        if self.prefetch and prefetch_index is not None and 0 <= prefetch_index < len(self.steps):
            new = [u for u in self.steps[prefetch_index].units if u not in self.gathered]
            if len(self.gathered) + len(new) <= MAX_GATHERED:
                for unit in new:
                    self._gather(unit, async_op=True)

    def release_all(self) -> None:
        for unit in list(self.gathered):
            self._release(unit)
        self.held = []

    # ---- forward hooks -------------------------------------------------------------------------------
    def _chunk_pre_forward(self, module, args) -> None:
        self.settle()

    def _chunk_post_forward(self, module, args, output) -> None:
        if _in_backward():
            return
        self._hook_output(output, len(self.steps) - 1)
        for unit in list(self.gathered):
            if unit not in self.held:
                self._release(unit)

    def _step_pre_hook(self, index: int):
        def hook(module, args) -> None:
            if _in_backward():  # activation recomputation: gather what the re-run needs, prefetch nothing
                self._enter(index, None)
                return
            if in_checkpointed_forward():
                self.steps[index].recomputed = True
            self._enter(index, index + 1)
        return hook

    def _step_post_hook(self, index: int):
        def hook(module, args, output) -> None:
            if not _in_backward():
                self._hook_output(output, index)
        return hook

    def _hook_output(self, output, index: int) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
            output.register_hook(lambda grad: self._pre_backward(index))

    # ---- backward ------------------------------------------------------------------------------------
    def _pre_backward(self, index: int) -> None:
        if self.backward_step == index:  # the last step is hooked twice (its output and the chunk's)
            return
        if self.backward_step is None:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self.backward_step = index
        self.held = []
        previous = index - 1 if index > 0 and not self.steps[index - 1].recomputed else None
        self._enter(index, previous)
        self.held = list(self.steps[index].units)

    def _backward_done(self) -> None:
        self.release_all()
        self.backward_step = None

    # ---- at rest -------------------------------------------------------------------------------------
    def local_pieces(self) -> dict[int, list[tuple[int, int, torch.Tensor]]]:
        """{id(param): [(start, end, view)]}: the flat range [start, end) of each sharded parameter that lies
        in this rank's persistent shard (none when it lies wholly in other ranks'), as a view of the shard:
        what a sharded checkpoint writes and loads into without gathering anything."""
        pieces: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for unit in self.units:
            for buffer, bucket in unit.buckets:
                shard_start, shard_end = bucket.shard_range(buffer.dp_rank, buffer.dp_size)
                for param in bucket.params:
                    param_start, param_end = (i - bucket.offset for i in buffer.param_index[id(param)])
                    lo, hi = max(param_start, shard_start) - param_start, min(param_end, shard_end) - param_start
                    pieces[id(param)] = [(lo, hi, buffer.param_shard_view(param, lo, hi))] if lo < hi else []
        return pieces

    def materialize(self) -> None:
        """Gather every unit (a state dict reads or writes whole parameters); settle() undoes it."""
        for unit in self.units:
            self._gather(unit, async_op=False, count=False)
        self.materialized = True

    def settle(self) -> None:
        """Back to rest: after materialize(), the full parameters (possibly overwritten by a checkpoint
        load) are copied into the shards and freed."""
        if self.materialized:
            for unit in self.gathered:
                unit.keep_gathered_shards()
            self.materialized = False
        self.release_all()
