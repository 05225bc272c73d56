"""Activation and gradient exchange between neighbouring pipeline stages (through collectives.py).

Activations travel forward (to the next pipeline rank), gradients backward (to the previous rank); with
virtual stages the last rank's "next" is rank 0 and rank 0's "previous" is the last rank, which
the pipeline group's ranks wrap around. Every tensor has the one shape both sides know from the
configuration, [seq / (TP if sequence parallel else 1), micro-batch, hidden] in params_dtype, so no shape
is ever exchanged (no extra round trip).

With PP = 2 the previous and the next rank are the same rank, so activations and gradients between
one pair of ranks would share a channel; messages on one channel are matched in order, and an exchange
that sends both at once could pair the wrong ones. As Megatron does, gradients then travel on the world
group, a separate channel (peers are global ranks, so any group containing both works).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Union

import torch

from megatron_lite import collectives
from megatron_lite.collectives import P2P
from megatron_lite.pipeline import shm_p2p
from megatron_lite.process_groups import ProcessGroups


def tensor_shape(config, seq_length: int, micro_batch_size: int) -> tuple[int, int, int]:
    """The shape of every tensor sent between stages: [s/cp (/tp with sequence parallelism), b, h]."""
    p = config.parallel
    tp = p.tensor_model_parallel_size
    seq_length //= p.context_parallel_size  # each CP rank holds 2 of the 2 x CP chunks (context_parallel/)
    if p.sequence_parallel and tp > 1:
        if seq_length % tp != 0:
            raise ValueError(f"--sequence-parallel: seq_length {seq_length} is not divisible by TP = {tp}")
        seq_length //= tp
    return (seq_length, micro_batch_size, config.model.hidden_size)


def _channels(groups: ProcessGroups) -> tuple[object, object]:
    """(group for activations, group for gradients)."""
    if groups.pp.size == 2:
        return groups.pp, groups.world  # the world group: a second channel between the same two ranks
    return groups.pp, groups.pp


class Posted:
    """Sends and receives started together; wait(name) waits for one of them ('send_next', 'send_prev',
    'recv_prev', 'recv_next', or post_ops' names) and returns the received tensor (None for a send).
    `pending`: the ops are being started by the communication thread (post_ops(background=True)); its
    result is the handles."""

    def __init__(self, handles: dict[str, list], received: dict[str, torch.Tensor], pending: Optional[Future] = None):
        self.handles, self.received, self.pending = handles, received, pending

    def wait(self, name: str) -> Optional[torch.Tensor]:
        if self.pending is not None:
            self.handles, self.pending = self.pending.result(), None  # re-raises the thread's error here
        for handle in self.handles.pop(name):
            handle.wait()
        return self.received.pop(name, None)


_POSTER: Optional[ThreadPoolExecutor] = None


def _poster() -> ThreadPoolExecutor:
    """The communication thread (one per process): starts posted ops in submission order, so messages on
    one channel keep the order the schedule posted them in."""
    global _POSTER
    if _POSTER is None:
        _POSTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-p2p")
    return _POSTER


def post(*, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
         recv_prev: bool = False, recv_next: bool = False, shape: tuple[int, ...], dtype: torch.dtype,
         device: torch.device, groups: ProcessGroups) -> Posted:
    """Start every requested send/receive at once without waiting (batched per group where the backend
    fuses a batch, NCCL; gloo starts each op on its own).

    send_next: an activation for the next stage; recv_prev: receive one from the previous stage.
    send_prev: a gradient for the previous stage; recv_next: receive one from the next stage.
    """
    pp = groups.pp
    prev_rank = pp.global_rank((pp.rank - 1) % pp.size)
    next_rank = pp.global_rank((pp.rank + 1) % pp.size)
    act_group, grad_group = _channels(groups)
    received = {}
    if recv_prev:
        received["recv_prev"] = torch.empty(shape, dtype=dtype, device=device)
    if recv_next:
        received["recv_next"] = torch.empty(shape, dtype=dtype, device=device)
    for name, tensor in (("send_next", send_next), ("send_prev", send_prev)):
        if tensor is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"pipeline {name}: tensor of shape {tuple(tensor.shape)}, but stages exchange {tuple(shape)} "
                             "([seq/tp if sequence parallel, micro-batch, hidden])")
    # One fixed op order on every rank (Megatron's: send_prev, recv_prev, send_next, recv_next), one batch
    # per group: backends that fuse a batch (NCCL) match ops per peer in issue order.
    planned = [("send_prev", P2P("send", send_prev.contiguous(), prev_rank, grad_group) if send_prev is not None else None),
               ("recv_prev", P2P("recv", received["recv_prev"], prev_rank, act_group) if recv_prev else None),
               ("send_next", P2P("send", send_next.contiguous(), next_rank, act_group) if send_next is not None else None),
               ("recv_next", P2P("recv", received["recv_next"], next_rank, grad_group) if recv_next else None)]
    return Posted(_start([(name, op) for name, op in planned if op is not None]), received)


def communicate(*, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                recv_prev: bool = False, recv_next: bool = False, shape: tuple[int, ...],
                dtype: torch.dtype, device: torch.device,
                groups: ProcessGroups) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Start every requested send/receive at once, wait for all, and return (from_prev, from_next)."""
    posted = post(send_next=send_next, send_prev=send_prev, recv_prev=recv_prev, recv_next=recv_next, shape=shape,
                  dtype=dtype, device=device, groups=groups)
    results = {name: posted.wait(name) for name in list(posted.handles)}
    return results.get("recv_prev"), results.get("recv_next")


def post_ops(transfers: list[tuple[str, Optional[torch.Tensor], int, str]], *, shape: tuple[int, ...],
             dtype: torch.dtype, device: torch.device, groups: ProcessGroups, background: bool = False,
             transport: Optional[shm_p2p.Transport] = None) -> Union[Posted, shm_p2p.ShmPosted]:
    """Start sends and receives with arbitrary neighbours (any schedule, ZB-V's V included) without waiting.

    Each transfer is (name, tensor to send or None to receive, peer pipeline rank, 'act' | 'grad'):
    activations travel on the pipeline group, gradients on _channels' gradient group, so at PP = 2 the two
    directions of one pair never share a channel. Messages on one channel match in posting order, which
    the schedules keep equal on both ends (the simulator checks it). wait(name) completes one.
    background (--overlap-p2p-comm): the communication thread starts the ops, so the compute thread does
    not pay for starting them: on gloo a send or receive call writes to the peer's socket and wakes its
    threads, ~10-30 us on idle cores but a median ~0.5 ms on the shared 2-core CI machine (issue 17,
    where starting them on the compute thread instead measured worse). The runner hands over all ops
    between two computations in one call (overlap.coalesce_posts_and_waits), one thread hand-off each.
    transport (shm_p2p.connect, same-host CPU ranks): the ops go through shared memory instead, started
    on this thread (a send is a copy, a receive's post nothing), background or not.
    """
    pp = groups.pp
    act_group, grad_group = _channels(groups)
    if transport is not None:
        return transport.post([(name, tensor, pp.global_rank(peer), direction,
                                act_group if direction == "act" else grad_group)
                               for name, tensor, peer, direction in transfers], shape, dtype, device)
    received, planned = {}, []
    for name, tensor, peer, direction in transfers:
        group = act_group if direction == "act" else grad_group
        if tensor is None:
            received[name] = torch.empty(shape, dtype=dtype, device=device)
            planned.append((name, P2P("recv", received[name], pp.global_rank(peer), group)))
        else:
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"pipeline {name}: tensor of shape {tuple(tensor.shape)}, but stages exchange "
                                 f"{tuple(shape)} ([seq/tp if sequence parallel, micro-batch, hidden])")
            planned.append((name, P2P("send", tensor.contiguous(), pp.global_rank(peer), group)))
    if background:
        return Posted({}, received, _poster().submit(_start, planned))
    return Posted(_start(planned), received)


def _start(planned: list[tuple[str, P2P]]) -> dict[str, list]:
    """Start the ops, one batch per group; returns each op's handles."""
    by_group: dict[int, list[tuple[str, P2P]]] = {}
    for name, op in planned:
        by_group.setdefault(id(op.group), []).append((name, op))
    handles: dict[str, list] = {}
    for named_ops in by_group.values():
        works = collectives.batch_isend_irecv([op for _, op in named_ops])
        for index, (name, _) in enumerate(named_ops):
            # one handle per op (gloo, and NCCL in most versions); a fused batch's handles are shared
            handles[name] = [works[index]] if len(works) == len(named_ops) else list(works)
    return handles
