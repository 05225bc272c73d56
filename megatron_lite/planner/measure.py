"""Measured activation memory: the bytes autograd keeps for backward, tracked while a step runs.

`ActivationMeter` installs torch.autograd.graph.saved_tensors_hooks: every tensor an op saves for
backward is packed into a holder that counts its storage (once per storage, however many ops save it or a
view of it) until autograd drops the holder (after that node's backward, or when the graph is freed).
Parameters' storages are excluded (they are `params`; ZeRO-3's gathered units are measured apart by
`measure_zero3_gathered`). Activation checkpointing
(tensor_parallel.random.checkpoint, torch's non-reentrant checkpoint) keeps its region's *inputs* alive by
reference rather than through these hooks, so while the meter is on, each checkpointed call's tensor
inputs are counted as saved until the region's backward has run. A split backward (ZB-H1, ZB-V) frees
autograd's saved tensors at B, but each deferred weight gradient (tensor_parallel.layers.DeferredWeightGrad)
keeps its GEMM's input and output gradient until the pipeline's W: while the meter is on, the runner's
Backward(defer_wgrad=True) counts those storages (once per storage, as above) until that W has run. What
is not counted: the recompute's
transient (one layer's worth, during that layer's backward), optimizer temporaries, and the allocator's
fragmentation: the planner's `other` allowance.

`peak` is the most bytes live at once over what ran under the meter: run one whole training step (all
micro-batches, the real schedule) to get the number the planner's activation model predicts.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


class _Held:
    __slots__ = ("tensor", "key", "meter", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key, meter: "ActivationMeter"):
        self.tensor, self.key, self.meter = tensor, key, meter
        meter._acquire(key, tensor)

    def __del__(self):
        self.meter._release(self.key)


class ActivationMeter:
    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        # parameters' storages by identity: ZeRO-3 resizes a unit's storage to gather it and back to 0 to
        # free it, so the gathered weights autograd saves are parameters too (zero3_gathered measures them)
        self.exclude = {p.untyped_storage()._cdata for p in parameters}
        self.refs: dict = {}
        self.sizes: dict = {}
        self.live = 0
        self.peak = 0

    @staticmethod
    def _storage_key(t: torch.Tensor):
        storage = t.untyped_storage()
        return (storage.data_ptr(), t.device.type, storage.nbytes())

    def _acquire(self, key, tensor: torch.Tensor) -> None:
        if key is None:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = key[2]
            self.live += key[2]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1

    def _release(self, key) -> None:
        if key is None or key not in self.refs:
            return
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def _pack(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return tensor
        key = self._storage_key(tensor)
        excluded = tensor.untyped_storage()._cdata in self.exclude
        return _Held(tensor, None if excluded or key[2] == 0 else key, self)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _checkpoint(self, original):
        meter = self

        def counted(function, *args, **kwargs):
            out = original(function, *args, **kwargs)
            held = [meter._pack(a) for a in args if isinstance(a, torch.Tensor)]
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            nodes = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
            if nodes:
                # released when the region's backward has run
                # (and with the graph, when it is freed: the hook's closure owns the holders)
                nodes[0].register_hook(lambda *_: held.clear())
            else:
                held.clear()
            return out
        return counted

    def _split_backward(self, original):
        """The pipeline runner's Backward, counting what each deferred weight gradient it queued keeps."""
        meter = self

        def backward(run, chunk: int, microbatch: int, sync_grads: bool, defer_wgrad: bool = False) -> None:
            original(run, chunk, microbatch, sync_grads, defer_wgrad)
            if defer_wgrad:
                held = [meter._pack(t) for item in run.weight_grads[(chunk, microbatch)]
                        for t in getattr(item, "tensors", ())]
                # released when W has run: the runner pops this (chunk, micro-batch)'s list, then drops it
                run.weight_grads[(chunk, microbatch)] = _HoldingList(run.weight_grads[(chunk, microbatch)], held)
        return backward

    @contextlib.contextmanager
    def __call__(self):
        import torch.utils.checkpoint as tuc
        from megatron_lite.pipeline.runner import _PipelineRun
        original, original_backward = tuc.checkpoint, _PipelineRun.backward
        tuc.checkpoint = self._checkpoint(original)
        _PipelineRun.backward = self._split_backward(original_backward)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            tuc.checkpoint, _PipelineRun.backward = original, original_backward


class _HoldingList(list):
    """A W's queued weight gradients, plus the meter's holders of what they keep (dropped with the list)."""

    def __init__(self, items, held: list) -> None:
        super().__init__(items)
        self.held = held


def measure_step_activations(model_chunks, run_step) -> int:
    """Peak saved-activation bytes of `run_step()` (one training step) on this rank."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    meter = ActivationMeter(params)
    with meter():
        run_step()
    return meter.peak


def measure_zero3_gathered(model_chunks, run_step) -> int:
    """Peak bytes of ZeRO-3's gathered full parameters on this rank during `run_step()`: the storages of the
    units gathered at once (over all chunks), read after every gather (0 without ZeRO-3)."""
    sharded = [chunk.zero3 for chunk in model_chunks if getattr(chunk, "zero3", None) is not None]
    if not sharded:
        run_step()
        return 0
    peak = 0

    def live() -> int:
        return sum(bucket.param_data.untyped_storage().nbytes() for z in sharded for unit in z.gathered
                   for _, bucket in unit.buckets)

    originals = [z._gather for z in sharded]

    def wrap(original):
        def gather(*args, **kwargs):
            nonlocal peak
            original(*args, **kwargs)
            peak = max(peak, live())
        return gather
    for z, original in zip(sharded, originals):
        z._gather = wrap(original)
    try:
        run_step()
    finally:
        for z, original in zip(sharded, originals):
            z._gather = original
    return peak
