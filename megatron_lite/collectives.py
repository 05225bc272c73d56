"""The one module that calls torch.distributed collectives and point-to-point operations.

Why one place:
- every call is counted per (group, op) in calls and bytes, so tests and benchmarks can assert the
  communication volume a feature promises (`comm_stats()`, `reset_comm_stats()`);
- a timed-out call raises `CollectiveTimeoutError` naming the op, the group and the rank, instead of an
  anonymous backend error or a silent hang; a call whose peer died raises `CollectivePeerLostError`,
  naming the same;
- backend gaps (gloo lacks some ops on some torch versions) are bridged here, with the same result.

Bytes counted per call are the size of the logical buffer the op works on: the tensor for all_reduce,
broadcast, send and recv; the gathered output for all_gather; the unreduced input for reduce_scatter;
the input for all_to_all.

Groups are `process_groups.Group` objects (or raw torch ProcessGroups, or None for the world). Device
placement is owned here as well: NCCL communicates CUDA tensors and gloo CPU tensors, so every tensor a
collective receives is checked against its group's backend (a clear error instead of an NCCL crash),
and values that have no device of their own (a loss to average, a flag, a norm) go through the scalar
helpers (`all_reduce_scalars`, `any_rank`, `broadcast_scalar`), which create their tensor on
`device_for(group)`.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_lite.process_groups import Group

_TIMEOUT_MINUTES = 10.0
_GROUP_NAMES: dict[object, str] = {}  # raw ProcessGroup -> name, registered by parallel_state
_BACKENDS: dict[object, str] = {}  # raw ProcessGroup (None = world) -> backend name, cached
_P2P_TARGETS: dict[tuple[object, int], tuple[Any, int]] = {}  # (raw group, global peer) -> (ProcessGroup, group rank)
# The device each backend communicates from; anything not listed uses the CPU.
BACKEND_DEVICE: dict[str, Callable[[], torch.device]] = {
    "nccl": lambda: torch.device("cuda", torch.cuda.current_device()),
}
_STATS_LOCK = threading.Lock()
_STATS: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (group, op) -> [calls, bytes]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
               "product": dist.ReduceOp.PRODUCT}
# torch >= 2.13 names the tensor variants *_single; older releases *_into_tensor / *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# thread id -> (op, group, start) of the call that thread is blocked in: the training thread and, under
# --overlap-p2p-comm, the pipeline's communication thread each have their own entry.
_IN_FLIGHT: dict[int, tuple[str, Any, float]] = {}


class CollectiveTimeoutError(RuntimeError):
    """A collective or p2p op did not complete within --distributed-timeout-minutes."""


class CollectivePeerLostError(RuntimeError):
    """A collective or p2p op failed because a peer's connection closed (the peer process died)."""


class CollectiveDeviceError(RuntimeError):
    """A tensor on a device the group's backend cannot communicate (e.g. a CPU tensor under NCCL)."""


def register_group_name(handle, name: str) -> None:
    """Name a raw ProcessGroup for accounting and error messages (parallel_state registers its own)."""
    _GROUP_NAMES.setdefault(handle, name)


def forget_group_names() -> None:
    _GROUP_NAMES.clear()
    _BACKENDS.clear()
    _P2P_TARGETS.clear()


def _handle(group):
    return group.handle if isinstance(group, Group) else group


def group_name(group) -> str:
    """'tp', 'dp', ... for a Group or a registered ProcessGroup; 'world' for the default group."""
    if isinstance(group, Group):
        return group.name
    if group is None or group is dist.GroupMember.WORLD:
        return "world"
    return _GROUP_NAMES.get(group, "other")


def backend_of(group) -> str:
    """The backend ('nccl', 'gloo', ...) a group communicates with; 'gloo' without torch.distributed."""
    handle = _handle(group)
    if handle not in _BACKENDS:
        if not (dist.is_available() and dist.is_initialized()):
            return "gloo"
        _BACKENDS[handle] = str(dist.get_backend(handle))
    return _BACKENDS[handle]


def device_for(group) -> torch.device:
    """The device a tensor must live on to be communicated over `group` (CUDA for NCCL, else CPU)."""
    make = BACKEND_DEVICE.get(backend_of(group))
    return make() if make is not None else torch.device("cpu")


def _check_device(op: str, tensor: torch.Tensor, group) -> None:
    expected = device_for(group)
    if tensor.device.type != expected.type:
        raise CollectiveDeviceError(
            f"{op} on group '{group_name(group)}': got a {tensor.device.type} tensor, but the "
            f"{backend_of(group)} backend communicates {expected.type} tensors. Create the tensor on "
            "collectives.device_for(group), or use the scalar helpers (all_reduce_scalars, any_rank).")


def set_timeout(minutes: float) -> None:
    global _TIMEOUT_MINUTES
    _TIMEOUT_MINUTES = minutes


def timeout_minutes() -> float:
    """--distributed-timeout-minutes, for transports outside torch.distributed (pipeline/shm_p2p.py)."""
    return _TIMEOUT_MINUTES


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
        entry = _STATS[(group_name(group), op)]
        entry[0] += 1
        entry[1] += nbytes


def count(group, op: str, nbytes: int) -> None:
    """Count an op that another transport carried (pipeline/shm_p2p.py) as if it ran on `group`."""
    _record(group, op, nbytes)


def tracked(op: str, group, fn):
    """Run a blocking wait of another transport as this module runs its own: listed by in_flight(), and an
    error worded as a timeout or a lost peer raised as CollectiveTimeoutError / CollectivePeerLostError."""
    return _call(op, group, fn)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _group_size(group) -> int:
    if isinstance(group, Group):
        return group.size
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _group_ranks(group):
    try:
        if isinstance(group, Group):
            return list(group.ranks)
        return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def _describe(op: str, group) -> str:
    return (f"{op} on group '{group_name(group)}' (ranks {_group_ranks(group)}) timed out after "
            f"{_TIMEOUT_MINUTES:g} min on rank {dist.get_rank()}: a peer never joined (crashed, or took a "
            "different code path). Check the other ranks' logs; raise --distributed-timeout-minutes only if "
            "they are just slow.")


def _backend_phrase(error: BaseException) -> str:
    """The backend's own words for the lost connection, e.g. 'Connection reset by peer'."""
    text = str(error)
    lower = text.lower()
    for phrase in _PEER_LOST_TEXT:
        start = lower.find(phrase)
        if start != -1:  # up to the end of the sentence or an address such as "[127.0.0.1]:57512"
            words = text[start:start + 120]
            cut = min((i for i in (words.find(". "), words.find(" ["), words.find("\n")) if i != -1), default=len(words))
            return words[:cut].rstrip(". ")
    return type(error).__name__


def _describe_lost(op: str, group, error: BaseException) -> str:
    return (f"{op} on group '{group_name(group)}' (ranks {_group_ranks(group)}) failed on rank {dist.get_rank()} "
            f"while waiting for a peer: '{_backend_phrase(error)}'. Another rank of this group "
            "died (killed, out of memory, or an error): its log says why. With torchrun --max-restarts N and "
            "--save D --load D the job restarts from the latest checkpoint.")


_TIMEOUT_TEXT = ("timed out", "timeout")
_PEER_LOST_TEXT = ("connection reset", "connection closed", "broken pipe", "connection refused",
                   "socket closed", "remote process exited", "communicator was aborted")


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in _TIMEOUT_TEXT)


def _is_peer_lost(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in _PEER_LOST_TEXT)


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
    """The ops this rank's threads are blocked in right now ("all_reduce on group 'tp' (ranks [0, 1]) for
    3.1 s", several joined by "; "), or None. Read from another thread (testing.py's heartbeat) to say where
    each rank hung."""
    current = list(_IN_FLIGHT.values())
    if not current:
        return None
    now = time.monotonic()
    # "<op> on group '<name>' (ranks [...])", as in errors
    return "; ".join(f"{_describe(op, group).split(' timed out')[0]} for {now - start:.1f} s" for op, group, start in current)


def _call(op: str, group, fn):
    """Run fn() and turn a backend timeout (CollectiveTimeoutError) or a dead peer (CollectivePeerLostError)
    into an error that names op, group and rank."""
    thread = threading.get_ident()
    _IN_FLIGHT[thread] = (op, group, time.monotonic())
    try:
        return fn()
    except RuntimeError as error:
        if _is_timeout(error):
            raise CollectiveTimeoutError(_describe(op, group)) from error
        if _is_peer_lost(error):
            raise CollectivePeerLostError(_describe_lost(op, group, error)) from error
        raise
    finally:
        _IN_FLIGHT.pop(thread, None)


def _run(op: str, group, call, async_op: bool):
    work = _call(op, group, call)
    return _Work(work, op, group) if async_op else None


# ---- collectives ---------------------------------------------------------------------------------
def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum", async_op: bool = False):
    """In-place all-reduce of `tensor` over `group`."""
    _record(group, "all_reduce", _nbytes(tensor))
    if _group_size(group) == 1:
        return _Work(None, "all_reduce", group) if async_op else None
    _check_device("all_reduce", tensor, group)
    handle = _handle(group)
    return _run("all_reduce", group, lambda: dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=handle, async_op=async_op), async_op)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """Gather equal-size `tensor`s from every rank into `output` (concatenated along dim 0, rank order)."""
    _record(group, "all_gather", _nbytes(output))
    if _group_size(group) == 1:
        output.copy_(tensor.reshape(output.shape))
        return _Work(None, "all_gather", group) if async_op else None
    _check_device("all_gather", output, group)
    handle = _handle(group)
    return _run("all_gather", group, lambda: _all_gather_single(output, tensor.contiguous(), group=handle, async_op=async_op), async_op)


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
    _check_device("reduce_scatter", tensor, group)
    handle = _handle(group)
    return _run("reduce_scatter", group,
                lambda: _reduce_scatter_single(output, tensor.contiguous(), op=_REDUCE_OPS[op], group=handle, async_op=async_op), async_op)


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


def all_to_all_single(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False,
                      output_split_sizes: Optional[Sequence[int]] = None,
                      input_split_sizes: Optional[Sequence[int]] = None):
    """Rank i's dim-0 block j of `tensor` goes to rank j, landing as block i of its `output`. Blocks are equal
    unless split sizes (rows per peer, in group order) are given. Counted as the bytes of `tensor`."""
    size = _group_size(group)
    _record(group, "all_to_all", _nbytes(tensor))
    if size == 1:
        output.copy_(tensor)
        return _Work(None, "all_to_all", group) if async_op else None
    _check_device("all_to_all", tensor, group)
    handle = _handle(group)
    if output_split_sizes is None and input_split_sizes is None:
        return _run("all_to_all", group, lambda: dist.all_to_all_single(output, tensor.contiguous(), group=handle,
                                                                         async_op=async_op), async_op)
    splits = dict(output_split_sizes=[int(x) for x in output_split_sizes], input_split_sizes=[int(x) for x in input_split_sizes])
    return _run("all_to_all", group, lambda: dist.all_to_all_single(output, tensor.contiguous(), group=handle,
                                                                     async_op=async_op, **splits), async_op)


def broadcast(tensor: torch.Tensor, src: int, group=None, async_op: bool = False):
    """Broadcast from global rank `src` (a member of `group`) to the rest of `group`, in place."""
    _record(group, "broadcast", _nbytes(tensor))
    if _group_size(group) == 1:
        return _Work(None, "broadcast", group) if async_op else None
    _check_device("broadcast", tensor, group)
    handle = _handle(group)
    return _run("broadcast", group, lambda: dist.broadcast(tensor, src=src, group=handle, async_op=async_op), async_op)


def broadcast_object(obj: Any, src: int, group=None) -> Any:
    """Broadcast a picklable object from global rank `src`; returns it on every rank."""
    if _group_size(group) == 1:
        return obj
    holder = [obj]
    handle = _handle(group)
    _run("broadcast_object", group, lambda: dist.broadcast_object_list(holder, src=src, group=handle), False)
    _record(group, "broadcast_object", 0)
    return holder[0]


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's picklable `obj`, in group rank order (for small metadata, never tensors' data)."""
    world = _group_size(group)
    if world == 1:
        return [obj]
    gathered: list = [None] * world
    handle = _handle(group)
    _run("all_gather_object", group, lambda: dist.all_gather_object(gathered, obj, group=handle), False)
    _record(group, "all_gather_object", 0)
    return gathered


def barrier(group=None) -> None:
    _record(group, "barrier", 0)
    if dist.is_initialized() and _group_size(group) > 1:
        handle = _handle(group)
        _run("barrier", group, lambda: dist.barrier(group=handle), False)


# ---- values without a device of their own ---------------------------------------------------------
def to_host(tensor: torch.Tensor) -> list:
    """A communicated tensor's values as Python numbers (one device-to-host copy)."""
    return tensor.tolist()


def all_reduce_scalars(values: Sequence[float], group=None, op: str = "sum") -> list[float]:
    """Reduce a few Python numbers over `group` (fp64, on the group's device); every rank gets the result."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device_for(group))
    all_reduce(tensor, group=group, op=op)
    return [float(v) for v in to_host(tensor)]


def all_reduce_scalar(value: float, group=None, op: str = "sum") -> float:
    return all_reduce_scalars([value], group, op)[0]


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of `group` if `flag` is True on any of them."""
    return all_reduce_scalar(1.0 if flag else 0.0, group, op="max") > 0.0


def broadcast_scalar(value: Optional[float], src: int, group=None) -> float:
    """The number `value` of global rank `src`, on every rank of `group` (others may pass None)."""
    tensor = torch.tensor([0.0 if value is None else float(value)], dtype=torch.float64, device=device_for(group))
    broadcast(tensor, src=src, group=group)
    return float(to_host(tensor)[0])


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
    _check_device("send", tensor, group)
    handle = _handle(group)
    _run("send", group, lambda: dist.send(tensor.contiguous(), dst=dst, group=handle), False)


def recv(tensor: torch.Tensor, src: int, group=None) -> None:
    _record(group, "recv", _nbytes(tensor))
    _check_device("recv", tensor, group)
    handle = _handle(group)
    _run("recv", group, lambda: dist.recv(tensor, src=src, group=handle), False)


def batch_isend_irecv(ops: Sequence[P2P]) -> list[_Work]:
    """Start several sends/receives together (one fused launch on NCCL); wait() on each handle.

    gloo has no batched p2p, so there each op is started individually with isend/irecv, which is
    deadlock-free for the same reason: nothing blocks until wait().
    """
    if not ops:
        return []
    for p in ops:
        _record(p.group, p.op, _nbytes(p.tensor))
        _check_device(p.op, p.tensor, p.group)
    backend = backend_of(ops[0].group)
    if backend == "nccl":
        p2p_ops = [dist.P2POp(dist.isend if p.op == "send" else dist.irecv, p.tensor, p.peer, _handle(p.group)) for p in ops]
        works = _call("batch_isend_irecv", ops[0].group, lambda: dist.batch_isend_irecv(p2p_ops))
        return [_Work(w, "batch_isend_irecv", ops[0].group) for w in works]
    handles = []
    for p in ops:
        # What dist.isend/irecv do after their argument checks, called directly: the pipeline posts up to
        # four of these per unit of compute, and under --overlap-p2p-comm from a second thread that holds
        # the GIL while it runs them, so the Python in between costs the compute thread too (issue 17).
        process_group, peer = _p2p_target(p.group, p.peer)
        tensor = torch.view_as_real(p.tensor) if p.tensor.is_complex() else p.tensor
        start = process_group.send if p.op == "send" else process_group.recv
        work = _call(p.op, p.group, lambda: start([tensor], peer, 0))
        handles.append(_Work(work, p.op, p.group))
    return handles


def _p2p_target(group, peer: int) -> tuple[Any, int]:
    """The ProcessGroup a p2p op on `group` runs on and `peer`'s rank in it (cached per group; the world
    group, None, is looked up each time since it can be re-initialised, and its ranks are the global ones)."""
    handle = _handle(group)
    if handle is None:
        return dist.distributed_c10d._get_default_group(), peer
    key = (handle, peer)
    if key not in _P2P_TARGETS:
        _P2P_TARGETS[key] = (handle, dist.get_group_rank(handle, peer))
    return _P2P_TARGETS[key]
