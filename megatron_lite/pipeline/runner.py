"""The one interpreter of pipeline action lists (schedules.py): runs forwards, backwards and exchanges.

forward_backward(...) is what get_forward_backward_func(config, groups) returns (Megatron's signature):
- forward_step_func(data_iterator, model_chunk) -> (output_tensor, loss_func);
- on the last stage loss_func(output_tensor) -> (loss, {"lm loss": detached value}); the loss is divided
  by num_microbatches before backward (so the accumulated gradient is that of the mean over micro-batches)
  and multiplied by grad_scale_func(loss) (the fp16 loss scale) when given;
- returns the per-micro-batch loss dicts on the last stage, [] elsewhere.

Memory discipline (Megatron's output-tensor deallocation): once an activation has been sent downstream,
its storage is replaced by a one-element placeholder; only its autograd node is kept, which is all the
backward needs, because backward starts from that node with the received gradient (custom_backward).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd import Variable

from megatron_lite.errors import ConfigError
from megatron_lite.distributed.model_chunk import ModelChunk, as_model_chunks
from megatron_lite.pipeline import p2p, shm_p2p
from megatron_lite.pipeline.actions import (RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD, Backward,
                                            Exchange, FinalizeGrads, Forward, P2POp, Post, Wait, WeightGrad, op_peer,
                                            op_stages, virtual_stage)
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.process_groups import ProcessGroups

Key = tuple[int, int]  # (chunk, micro-batch)


def deallocate_output_tensor(output: Optional[torch.Tensor]) -> bool:
    """Free an already-sent activation's storage, keeping its autograd node. Skipped (returns False) for
    a view (its storage belongs to another tensor) or when the producing op saved its own result for
    backward (e.g. tanh), whose backward would then read the placeholder."""
    if output is None or output._base is not None or output.grad_fn is None:
        return False
    if hasattr(output.grad_fn, "_saved_result"):
        return False
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)
    return True


def custom_backward(output: torch.Tensor, grad_output: Optional[torch.Tensor]) -> None:
    """Backward from `output` with `grad_output`, without torch.autograd.backward's check that the two have
    the same shape (the output's storage may have been deallocated after it was sent)."""
    if grad_output is None:
        if output.numel() != 1:
            raise RuntimeError("backward without an output gradient needs a scalar loss")
        grad_output = torch.ones_like(output, memory_format=torch.preserve_format)
    Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad_output,), keep_graph=False, create_graph=False,
        inputs=tuple(), allow_unreachable=True, accumulate_grad=True)


class _PipelineRun:
    """State of one forward_backward call on one rank: the tensors in flight, keyed by (chunk, mb)."""

    def __init__(self, *, forward_step_func: Callable, data_iterators: list, model: list[nn.Module],
                 num_microbatches: int, shape: tuple[int, ...], dtype: torch.dtype, forward_only: bool,
                 no_sync_funcs: list[Optional[Callable]], finalize_model_grads_func: Optional[Callable],
                 grad_scale_func: Optional[Callable], groups: ProcessGroups, v_shape: bool = False,
                 p2p_transport: str = "auto"):
        # forward_step_func gets the chunks as the caller gave them; the engine drives them as ModelChunks.
        self.forward_step_func, self.data_iterators, self.model = forward_step_func, data_iterators, model
        self.chunks: list[ModelChunk] = as_model_chunks(model)
        self.num_microbatches, self.shape, self.dtype = num_microbatches, shape, dtype
        self.forward_only, self.no_sync_funcs = forward_only, no_sync_funcs
        self.finalize_model_grads_func, self.grad_scale_func = finalize_model_grads_func, grad_scale_func
        self.groups = groups
        self.pp_size, self.pp_rank, self.num_chunks = groups.pp.size, groups.pp.rank, len(model)
        self.device = next((param.device for chunk in model for param in chunk.parameters()), torch.device("cpu"))
        # same-host CPU ranks exchange through shared memory (collective over the pipeline group on first use)
        self.transport = shm_p2p.connect(groups, shape, dtype, self.device, p2p_transport)
        self.inputs: dict[Key, Optional[torch.Tensor]] = {}    # received activations (kept for backward)
        self.outputs: dict[Key, torch.Tensor] = {}             # outputs (loss on the last stage)
        self.output_grads: dict[Key, torch.Tensor] = {}        # received gradients of the outputs
        self.input_grads: dict[Key, Optional[torch.Tensor]] = {}  # gradients to send upstream
        self.posted: dict[tuple[str, int, int], tuple] = {}   # op -> ((p2p.Posted, name) or None, tensor it sends)
        self.local: dict[tuple[int, int, int], torch.Tensor] = {}  # (src stage, dst stage, mb) -> copy in transit
        self.v_shape = v_shape  # ZB-V's chunk placement (actions.virtual_stage)
        self.wgrad_queues: list[list] = [[] for _ in model]     # filled by the linear layers during a split B
        self.weight_grads: dict[Key, list] = {}                # (chunk, mb) -> its queued weight gradients
        self.losses: list[dict] = []
        # compute_s: wall seconds inside the model's forward (with the loss), backward (B) and W, per kind:
        # the rest of a step is pipeline idle (waits) and runtime overhead (bubble benchmark)
        self.stats = {"max_in_flight": 0, "deallocated": 0, "sent": 0, "peak_stored_bytes": 0,
                      "compute_s": {"F": 0.0, "B": 0.0, "W": 0.0},
                      "p2p_transport": "shm" if self.transport is not None else "process-group"}
        self.in_flight = 0

    def virtual_stage(self, chunk: int) -> int:
        return virtual_stage(self.pp_size, self.pp_rank, chunk, self.v_shape)

    def is_first(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == 0

    def is_last(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == self.pp_size * self.num_chunks - 1

    def _track_memory(self) -> None:
        stored = sum(t.numel() * t.element_size() for t in (*self.inputs.values(), *self.outputs.values())
                     if t is not None)
        self.stats["peak_stored_bytes"] = max(self.stats["peak_stored_bytes"], stored)

    # ---- actions -----------------------------------------------------------------------------------
    def forward(self, chunk: int, microbatch: int) -> None:
        key = (chunk, microbatch)
        input_tensor = self.inputs.get(key)
        if not self.is_first(chunk) and input_tensor is None:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: forward of chunk {chunk}, micro-batch {microbatch} "
                               "has no input (schedule bug)")
        self.chunks[chunk].set_input_tensor(input_tensor)
        start = time.perf_counter()
        with torch.no_grad() if self.forward_only else contextlib.nullcontext():
            output, loss_func = self.forward_step_func(self.data_iterators[chunk], self.model[chunk])
            if self.is_last(chunk):
                loss, loss_dict = loss_func(output)
                self.losses.append(loss_dict)
                output = loss / self.num_microbatches
        self.stats["compute_s"]["F"] += time.perf_counter() - start
        self.outputs[key] = output
        self.in_flight += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        self._track_memory()
        if self.forward_only and self.is_last(chunk):
            self._release(key)

    def backward(self, chunk: int, microbatch: int, sync_grads: bool, defer_wgrad: bool = False) -> None:
        key = (chunk, microbatch)
        input_tensor, output = self.inputs.pop(key, None), self.outputs.pop(key)
        output_grad = self.output_grads.pop(key, None)
        if self.is_last(chunk) and self.grad_scale_func is not None:
            output = self.grad_scale_func(output)
        start = time.perf_counter()
        with self._grad_sync(chunk, sync_grads):
            custom_backward(output, output_grad)
        self.stats["compute_s"]["B"] += time.perf_counter() - start
        if defer_wgrad:  # what the linear layers queued is this micro-batch's W
            self.weight_grads[key] = list(self.wgrad_queues[chunk])
            self.wgrad_queues[chunk].clear()
        if not self.is_first(chunk):
            self.input_grads[key] = input_tensor.grad
        if not defer_wgrad:
            self.in_flight -= 1

    def weight_grad(self, chunk: int, microbatch: int, sync_grads: bool) -> None:
        """W: the weight gradients Backward(defer_wgrad=True) queued for this (chunk, micro-batch)."""
        start = time.perf_counter()
        with self._grad_sync(chunk, sync_grads):
            for compute in self.weight_grads.pop((chunk, microbatch)):
                compute()
        self.stats["compute_s"]["W"] += time.perf_counter() - start
        self.in_flight -= 1  # W was the last use of this micro-batch's saved activations

    def _grad_sync(self, chunk: int, sync_grads: bool):
        no_sync = self.no_sync_funcs[chunk]
        return contextlib.nullcontext() if sync_grads or no_sync is None else no_sync()

    def enable_split_backward(self) -> None:
        """Give every linear layer of each chunk that chunk's weight-gradient queue (see layers.py)."""
        for chunk, module in enumerate(self.model):
            for sub in module.modules():
                if hasattr(type(sub), "wgrad_queue"):
                    sub.wgrad_queue = self.wgrad_queues[chunk]

    def disable_split_backward(self) -> None:
        for module in self.model:
            for sub in module.modules():
                if hasattr(type(sub), "wgrad_queue"):
                    sub.wgrad_queue = None

    def exchange(self, action: Exchange) -> None:
        self.post(action.ops)
        self.wait(action.ops)

    def post(self, ops: Sequence[P2POp], background: bool = False) -> None:
        """Start ops (one batch) without waiting; wait() completes each. A transfer between two chunks
        of this rank (ZB-V's turn) is a copy kept in self.local until its receive is waited for.
        background: started by the communication thread (p2p.post_ops), for Post actions."""
        transfers, names = [], {}
        for op in ops:
            key, chunk_mb = (op.kind, op.chunk, op.microbatch), (op.chunk, op.microbatch)
            sending = op.kind in (SEND_FORWARD, SEND_BACKWARD)
            tensor = (self.outputs[chunk_mb] if op.kind == SEND_FORWARD else
                      self.input_grads.pop(chunk_mb) if op.kind == SEND_BACKWARD else None)
            peer = op_peer(op, self.pp_size, self.pp_rank)
            if peer == self.pp_rank:
                if sending:
                    self.local[op_stages(op, self.pp_size, self.pp_rank) + (op.microbatch,)] = tensor.detach().clone()
                self.posted[key] = (None, tensor if op.kind == SEND_FORWARD else None)
                continue
            names[key] = "/".join(map(str, key))
            transfers.append((names[key], tensor, peer, "act" if op.kind in (SEND_FORWARD, RECV_FORWARD) else "grad"))
            self.posted[key] = (None, tensor if op.kind == SEND_FORWARD else None)
        if transfers:
            posted = p2p.post_ops(transfers, shape=self.shape, dtype=self.dtype, device=self.device, groups=self.groups,
                                  background=background, transport=self.transport)
            for key, name in names.items():
                self.posted[key] = ((posted, name), self.posted[key][1])

    def wait(self, ops: Sequence[P2POp]) -> None:
        """Complete posted ops: store what was received; free an activation once its send is done."""
        for op in ops:
            key = (op.chunk, op.microbatch)
            handle, sent = self.posted.pop((op.kind, op.chunk, op.microbatch))
            if handle is not None:
                received = handle[0].wait(handle[1])
            elif op.kind in (RECV_FORWARD, RECV_BACKWARD):  # from this rank's other chunk
                received = self.local.pop(op_stages(op, self.pp_size, self.pp_rank) + (op.microbatch,))
            if op.kind == SEND_FORWARD:
                self.stats["sent"] += 1
                if self.forward_only:
                    self._release(key)
                elif deallocate_output_tensor(sent):
                    self.stats["deallocated"] += 1
            elif op.kind == RECV_FORWARD:
                self.inputs[key] = received.requires_grad_(not self.forward_only)
            elif op.kind == RECV_BACKWARD:
                self.output_grads[key] = received
        self._track_memory()

    def _release(self, key: Key) -> None:
        self.outputs.pop(key, None)
        self.inputs.pop(key, None)
        self.in_flight -= 1

    def run(self, actions: Sequence) -> list[dict]:
        split = any(isinstance(action, WeightGrad) for action in actions)
        if split:
            self.enable_split_backward()
        try:
            self._run(actions)
        finally:
            if split:
                self.disable_split_backward()
        if self.outputs or self.inputs or self.output_grads or self.input_grads or self.posted or self.weight_grads \
                or self.local:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: tensors left over after the schedule "
                               f"({len(self.outputs)} outputs, {len(self.inputs)} inputs): schedule bug")
        return self.losses if any(self.is_last(chunk) for chunk in range(self.num_chunks)) else []

    def _run(self, actions: Sequence) -> None:
        for action in actions:
            if isinstance(action, Forward):
                self.forward(action.chunk, action.microbatch)
            elif isinstance(action, Backward):
                self.backward(action.chunk, action.microbatch, action.sync_grads, action.defer_wgrad)
            elif isinstance(action, WeightGrad):
                self.weight_grad(action.chunk, action.microbatch, action.sync_grads)
            elif isinstance(action, Exchange):
                self.exchange(action)
            elif isinstance(action, Post):
                self.post(action.ops, background=True)
            elif isinstance(action, Wait):
                self.wait(action.ops)
            elif isinstance(action, FinalizeGrads):
                if self.finalize_model_grads_func is not None:
                    self.finalize_model_grads_func(self.chunks, self.groups)
            else:
                raise TypeError(f"unknown pipeline action {action!r}")


def forward_backward(*, schedule: str, forward_step_func: Callable, data_iterator: Union[Iterator, list, None],
                     model: Union[nn.Module, list[nn.Module]], num_microbatches: int, seq_length: int,
                     micro_batch_size: int, config: Any, forward_only: bool = False,
                     no_sync_func: Union[Callable, list, None] = None,
                     finalize_model_grads_func: Optional[Callable] = None, grad_scale_func: Optional[Callable] = None,
                     stats: Optional[dict] = None, groups: Optional[ProcessGroups] = None) -> list[dict]:
    """Run schedule `schedule` for this pipeline rank over num_microbatches micro-batches.

    `groups` (default: one process) gives the pipeline group; model chunks that are not ModelChunks are
    wrapped in LocalChunk (no data-parallel reduction). finalize_model_grads_func(chunks, groups) runs once
    after all backwards.
    With several model chunks (virtual stages) data_iterator is a list, one per chunk. no_sync_func (or a
    list, one per chunk) returns a context manager under which backward must not start data-parallel
    grad reduction; it wraps every backward but each chunk's last. `stats`, if given, receives max_in_flight,
    deallocated, sent, peak_stored_bytes, compute_s (seconds inside forward, B and W) and p2p_transport (shm
    or process-group).
    """
    model = list(model) if isinstance(model, (list, tuple)) else [model]
    num_chunks = len(model)
    groups = groups or ProcessGroups.single()
    if groups.pp.size != config.parallel.pipeline_model_parallel_size:
        raise ConfigError(f"--pipeline-model-parallel-size: the config says {config.parallel.pipeline_model_parallel_size} "
                          f"but the process groups have PP = {groups.pp.size}. Pass groups=parallel_state.get_process_groups().")
    # Every check happens here, identically on every rank, before the first send.
    actions = build_schedule(schedule, groups.pp.size, groups.pp.rank, num_chunks, num_microbatches, forward_only,
                             config.parallel.microbatch_group_size_per_vp_stage, config.parallel.overlap_p2p_comm)
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != num_chunks:
            raise ValueError(f"data_iterator: {len(data_iterator)} iterators for {num_chunks} model chunks")
        data_iterators = list(data_iterator)
    elif num_chunks == 1:
        data_iterators = [data_iterator]
    else:
        raise ValueError("data_iterator: with virtual pipeline stages pass a list, one iterator per model chunk")
    no_sync_funcs = list(no_sync_func) if isinstance(no_sync_func, (list, tuple)) else [no_sync_func] * num_chunks
    run = _PipelineRun(forward_step_func=forward_step_func, data_iterators=data_iterators, model=model,
                       num_microbatches=num_microbatches, shape=p2p.tensor_shape(config, seq_length, micro_batch_size),
                       dtype=config.params_dtype, forward_only=forward_only, no_sync_funcs=no_sync_funcs,
                       finalize_model_grads_func=finalize_model_grads_func, grad_scale_func=grad_scale_func,
                       groups=groups, v_shape=schedule == "zbv",
                       p2p_transport=config.parallel.pipeline_p2p_transport)
    if getattr(getattr(config, "moe", None), "is_moe", False) and not forward_only:
        from megatron_lite.models.moe import set_aux_loss_scale
        # MoE balancing losses get the gradient one micro-batch's LM loss gets (loss scale x CP / micro-batches).
        scale = float(grad_scale_func(torch.ones(1))[0]) if grad_scale_func is not None else 1.0
        set_aux_loss_scale(model, scale * groups.cp.size / num_microbatches)
    losses = run.run(actions)
    if stats is not None:
        stats.update(run.stats)
    return losses


def get_forward_backward_func(config, groups: Optional[ProcessGroups] = None) -> Callable[..., list[dict]]:
    """The forward_backward_func for this configuration's pipeline schedule (auto: pipeline/auto.py), bound
    to `groups`."""
    from megatron_lite.pipeline.auto import resolve  # the simulator is only needed here
    name = resolve(config).name

    def forward_backward_func(**kwargs) -> list[dict]:
        kwargs.setdefault("groups", groups)
        return forward_backward(schedule=name, **kwargs)

    forward_backward_func.schedule = name  # type: ignore[attr-defined]
    return forward_backward_func
