"""The one module that calls torch.distributed collectives and point-to-point operations.

Why one place:
- every call is counted per (group, op) in calls and bytes, so tests and benchmarks can assert the
  communication volume a feature promises (`comm_stats()`, `reset_comm_stats()`);
- a timed-out call raises `CollectiveTimeoutError` naming the op, the group and the rank, instead of an
  anonymous backend error or a silent hang;
- backend gaps (gloo lacks some ops on some torch versions) are bridged here, with the same result.

Bytes counted per call are the size of the logical buffer the op works on: the tensor for all_reduce,
broadcast, send and recv; the gathered output for all_gather; the unreduced input for reduce_scatter;
the input for all_to_all.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lite import parallel_state

_TIMEOUT_MINUTES = 10.0
_STATS_LOCK = threading.Lock()
_STATS: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (group, op) -> [calls, bytes]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
               "product": dist.ReduceOp.PRODUCT}
# torch >= 2.13 names the tensor variants *_single; older releases *_into_tensor / *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_IN_FLIGHT: Optional[tuple[str, Any, float]] = None  # (op, group, start) of the call this rank is blocked in


class CollectiveTimeoutError(RuntimeError):
    """A collective or p2p op did not complete within --distributed-timeout-minutes."""


def set_timeout(minutes: float) -> None:
    global _TIMEOUT_MINUTES
    _TIMEOUT_MINUTES = minutes


def comm_stats() -> dict[tuple[str, str], dict[str, int]]:
    """{(group name, op): {"calls": n, "bytes": b}} since the last reset, for this rank."""
    with _STATS_LOCK:
        return {key: {"calls": calls, "bytes": nbytes} for key, (calls, nbytes) in _STATS.items()}


def reset_comm_stats() -> None:
    with _STATS_LOCK:
        _STATS.clear()


def bytes_for(op: Optional[str] = None, group: Optional[str] = None) -> int:
    """Total bytes counted for an op and/or a group name (None matches all)."""
    return sum(v["bytes"] for (g, o), v in comm_stats().items()
               if (op is None or o == op) and (group is None or g == group))


def _record(group, op: str, nbytes: int) -> None:
    with _STATS_LOCK:
        entry = _STATS[(parallel_state.group_name(group), op)]
        entry[0] += 1
        entry[1] += nbytes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _describe(op: str, group) -> str:
    name = parallel_state.group_name(group)
    try:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    except Exception:  # noqa: BLE001 - only for the message
        ranks = "?"
    return (f"{op} on group '{name}' (ranks {ranks}) timed out after {_TIMEOUT_MINUTES:g} min on rank "
            f"{dist.get_rank()}: a peer never joined (crashed, or took a different code path). "
            "Check the other ranks' logs; raise --distributed-timeout-minutes only if they are just slow.")


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


class _Work:
    """Wraps an async handle so that wait() translates timeouts like the sync path does."""

    def __init__(self, work, op: str, group):
        self._work, self._op, self._group = work, op, group

    def wait(self) -> None:
        if self._work is not None:
            _call(self._op, self._group, self._work.wait)

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()


def in_flight() -> Optional[str]:
    """The op this rank is blocked in right now ("all_reduce on group 'tp' (ranks [0, 1]) for 3.1 s"), or
    None. Read from another thread (testing.py's heartbeat) to say where each rank hung."""
    current = _IN_FLIGHT
    if current is None:
        return None
    op, group, start = current
    where = _describe(op, group).split(" timed out")[0]  # "<op> on group '<name>' (ranks [...])", as in errors
    return f"{where} for {time.monotonic() - start:.1f} s"


def _call(op: str, group, fn):
    """Run fn() and turn a backend timeout into a CollectiveTimeoutError that names op, group and rank."""
    global _IN_FLIGHT
    _IN_FLIGHT = (op, group, time.monotonic())
    try:
        return fn()
    except RuntimeError as error:
        if _is_timeout(error):
            raise CollectiveTimeoutError(_describe(op, group)) from error
        raise
    finally:
        _IN_FLIGHT = None


def _run(op: str, group, call, async_op: bool):
    work = _call(op, group, call)
    return _Work(work, op, group) if async_op else None


# ---- collectives ---------------------------------------------------------------------------------
def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum", async_op: bool = False):
    """In-place all-reduce of `tensor` over `group`."""
    _record(group, "all_reduce", _nbytes(tensor))
    if _group_size(group) == 1:
        return _Work(None, "all_reduce", group) if async_op else None
    return _run("all_reduce", group, lambda: dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group, async_op=async_op), async_op)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """Gather equal-size `tensor`s from every rank into `output` (concatenated along dim 0, rank order)."""
    _record(group, "all_gather", _nbytes(output))
    if _group_size(group) == 1:
        output.copy_(tensor.reshape(output.shape))
        return _Work(None, "all_gather", group) if async_op else None
    return _run("all_gather", group, lambda: _all_gather_single(output, tensor.contiguous(), group=group, async_op=async_op), async_op)


def all_gather(tensor: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Gather `tensor` from every rank of `group` and concatenate along `dim` (a new tensor)."""
    world = _group_size(group)
    if world == 1:
        _record(group, "all_gather", _nbytes(tensor))
        return tensor
    moved = tensor.movedim(dim, 0).contiguous()
    output = torch.empty((world * moved.shape[0],) + tuple(moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    all_gather_into_tensor(output, moved, group)
    return output if dim == 0 else output.movedim(0, dim).contiguous()


def reduce_scatter_tensor(output: torch.Tensor, tensor: torch.Tensor, group=None, op: str = "sum", async_op: bool = False):
    """Reduce `tensor` over `group` and leave this rank's dim-0 chunk in `output`."""
    _record(group, "reduce_scatter", _nbytes(tensor))
    world = _group_size(group)
    if world == 1:
        output.copy_(tensor.reshape(output.shape))
        return _Work(None, "reduce_scatter", group) if async_op else None
    return _run("reduce_scatter", group,
                lambda: _reduce_scatter_single(output, tensor.contiguous(), op=_REDUCE_OPS[op], group=group, async_op=async_op), async_op)


def reduce_scatter(tensor: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Sum `tensor` over `group` and return this rank's chunk along `dim` (a new tensor)."""
    world = _group_size(group)
    if world == 1:
        _record(group, "reduce_scatter", _nbytes(tensor))
        return tensor
    moved = tensor.movedim(dim, 0).contiguous() if dim != 0 else tensor.contiguous()
    if moved.shape[0] % world != 0:
        raise ValueError(f"reduce_scatter: dim {dim} of size {moved.shape[0]} is not divisible by the group size {world}")
    output = torch.empty((moved.shape[0] // world,) + tuple(moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    reduce_scatter_tensor(output, moved, group)
    return output if dim == 0 else output.movedim(0, dim).contiguous()


def all_to_all_single(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    _record(group, "all_to_all", _nbytes(tensor))
    if _group_size(group) == 1:
        output.copy_(tensor)
        return _Work(None, "all_to_all", group) if async_op else None
    return _run("all_to_all", group, lambda: dist.all_to_all_single(output, tensor.contiguous(), group=group, async_op=async_op), async_op)


def broadcast(tensor: torch.Tensor, src: int, group=None, async_op: bool = False):
    """Broadcast from global rank `src` (a member of `group`) to the rest of `group`, in place."""
    _record(group, "broadcast", _nbytes(tensor))
    if _group_size(group) == 1:
        return _Work(None, "broadcast", group) if async_op else None
    return _run("broadcast", group, lambda: dist.broadcast(tensor, src=src, group=group, async_op=async_op), async_op)


def broadcast_object(obj: Any, src: int, group=None) -> Any:
    """Broadcast a picklable object from global rank `src`; returns it on every rank."""
    if _group_size(group) == 1:
        return obj
    holder = [obj]
    _run("broadcast_object", group, lambda: dist.broadcast_object_list(holder, src=src, group=group), False)
    _record(group, "broadcast_object", 0)
    return holder[0]


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's picklable `obj`, in group rank order (for small metadata, never tensors' data)."""
    world = _group_size(group)
    if world == 1:
        return [obj]
    gathered: list = [None] * world
    _run("all_gather_object", group, lambda: dist.all_gather_object(gathered, obj, group=group), False)
    _record(group, "all_gather_object", 0)
    return gathered


def barrier(group=None) -> None:
    _record(group, "barrier", 0)
    if dist.is_initialized() and _group_size(group) > 1:
        _run("barrier", group, lambda: dist.barrier(group=group), False)


# ---- point to point ------------------------------------------------------------------------------
@dataclass
class P2P:
    """One point-to-point operation: op is 'send' or 'recv'; peer is a global rank."""
    op: str
    tensor: torch.Tensor
    peer: int
    group: Any = None


def send(tensor: torch.Tensor, dst: int, group=None) -> None:
    _record(group, "send", _nbytes(tensor))
    _run("send", group, lambda: dist.send(tensor.contiguous(), dst=dst, group=group), False)


def recv(tensor: torch.Tensor, src: int, group=None) -> None:
    _record(group, "recv", _nbytes(tensor))
    _run("recv", group, lambda: dist.recv(tensor, src=src, group=group), False)


def batch_isend_irecv(ops: Sequence[P2P]) -> list[_Work]:
    """Start several sends/receives together (one fused launch on NCCL); wait() on each handle.

    gloo has no batched p2p, so there each op is started individually with isend/irecv, which is
    deadlock-free for the same reason: nothing blocks until wait().
    """
    if not ops:
        return []
    for p in ops:
        _record(p.group, p.op, _nbytes(p.tensor))
    backend = dist.get_backend(ops[0].group)
    if backend == "nccl":
        p2p_ops = [dist.P2POp(dist.isend if p.op == "send" else dist.irecv, p.tensor, p.peer, p.group) for p in ops]
        works = _call("batch_isend_irecv", ops[0].group, lambda: dist.batch_isend_irecv(p2p_ops))
        return [_Work(w, "batch_isend_irecv", ops[0].group) for w in works]
    handles = []
    for p in ops:
        start = dist.isend if p.op == "send" else dist.irecv
        work = _call(p.op, p.group, lambda: start(p.tensor, p.peer, group=p.group))
        handles.append(_Work(work, p.op, p.group))
    return handles
