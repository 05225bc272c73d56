"""Pipeline sends and receives through shared memory, between ranks of one host (CPU tensors).

Why: on one host gloo moves every activation through a TCP socket, after a "recv ready" handshake with
the receiver, and completes it through its worker thread. On the 2-core CI machine that costs ~0.5 ms
per message after an idle moment, on the pipeline's critical path (issue 17's breakdown in
benchmarks/RESULTS.md). NCCL uses shared memory between the GPUs of one node for the same reason.

How: each directed channel (sender, receiver, activations | gradients) is a ring of `slots` message
slots in a file under /dev/shm, plus two FIFOs. The sender copies a message into the next slot and
writes one byte to `ready`; the receiver reads that byte, copies the slot out and writes one byte to
`free`, which returns the slot to the sender. So a send never waits for its receiver: when every slot is
taken, the message is copied aside and a flusher thread writes it as slots free up. A receive is one
blocking read of one byte. Neither side hands work to a thread in the common case.

Matching is gloo's: messages on a channel arrive in the order they were sent, and each receive posted on
it takes the next one, whatever order the receives are waited for in. The schedules keep both ends'
orders equal (the simulator checks it).

The files are unlinked as soon as both ends have opened them, so a crash leaves nothing behind. A
receive that waits longer than --distributed-timeout-minutes, or whose sender has exited, raises the
same CollectiveTimeoutError / CollectivePeerLostError a gloo receive would.
"""
from __future__ import annotations

import math
import os
import select
import socket
import threading
import time
import uuid
from collections import deque
from typing import Optional

import torch

from megatron_lite import collectives
from megatron_lite.errors import ConfigError
from megatron_lite.process_groups import ProcessGroups

SHM_DIR = "/dev/shm"
MAX_SLOTS = 32                 # enough for every message of a step in flight at the benchmark's sizes
RING_BUDGET_BYTES = 16 << 20   # per channel; big messages get fewer slots (at least 1)
DIRECTIONS = ("act", "grad")
_POLL_S = 0.5                  # how often a blocked receive checks that its sender is still alive


def _host_id() -> str:
    """Ranks with the same id share /dev/shm and see each other's pids: the host name, this boot, and the
    mount and pid namespaces (ranks in separate containers of one host fall back to the process group)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            parts.append(fh.read().strip())
    except OSError:
        parts.append("?")
    for namespace in ("mnt", "pid"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{namespace}"))
        except OSError:
            parts.append("?")
    return "/".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its launcher has not reaped yet is a zombie, not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class _Channel:
    """One direction of one pair: the shared slots and the two FIFOs, opened by this process."""

    def __init__(self, path: str, slots: int, nbytes: int, create: bool):
        if create:
            with open(path + ".buf", "wb") as fh:
                fh.truncate(slots * nbytes)
            for fifo in (".ready", ".free"):
                os.mkfifo(path + fifo, 0o600)
        self.path, self.slots, self.nbytes, self.index = path, slots, nbytes, 0
        self.buffer = torch.from_file(path + ".buf", shared=True, size=slots * nbytes, dtype=torch.uint8)
        # O_RDWR: opening a FIFO never blocks for the other end; non-blocking: waits go through select
        self.ready = os.open(path + ".ready", os.O_RDWR | os.O_NONBLOCK)
        self.free = os.open(path + ".free", os.O_RDWR | os.O_NONBLOCK)

    def slot(self) -> torch.Tensor:
        start = (self.index % self.slots) * self.nbytes
        return self.buffer[start:start + self.nbytes]

    def unlink(self) -> None:
        for suffix in (".buf", ".ready", ".free"):
            os.unlink(self.path + suffix)


class _Sender(_Channel):
    def __init__(self, *args):
        super().__init__(*args)
        self.credits = self.slots
        self.backlog: deque = deque()   # messages waiting for a free slot (copies), in send order
        self.lock = threading.Lock()    # the flusher thread writes the backlog

    def send(self, data: torch.Tensor) -> None:
        with self.lock:
            if not self.backlog and self._credit():
                self._write(data)
                return
            self.backlog.append(data.clone())  # the caller may free its tensor once send() returns
        _flusher().wake()

    def flush(self) -> bool:
        """Write what the backlog can; True when it is empty."""
        with self.lock:
            while self.backlog and self._credit():
                self._write(self.backlog.popleft())
            return not self.backlog

    def _credit(self) -> bool:
        if self.credits == 0:
            try:
                self.credits += len(os.read(self.free, self.slots))
            except BlockingIOError:
                return False
        return True

    def _write(self, data: torch.Tensor) -> None:
        self.slot().copy_(data)
        os.write(self.ready, b"\0")  # a syscall after the copy: the receiver sees the data once it sees this
        self.index += 1
        self.credits -= 1


class _Receiver(_Channel):
    def __init__(self, *args, peer_pid: int):
        super().__init__(*args)
        self.peer_pid = peer_pid
        self.posted: deque = deque()  # [tensor, done] of posted receives, in post order

    def complete(self, handle: list, timeout_s: float) -> None:
        """Take messages, in order, into the posted receives up to and including `handle`'s."""
        while not handle[1]:
            head = self.posted.popleft()
            self._take_ready(timeout_s)
            head[0].view(-1).view(torch.uint8).copy_(self.slot())
            self.index += 1
            os.write(self.free, b"\0")
            head[1] = True

    def _take_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if os.read(self.ready, 1):
                    return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:  # worded for collectives._call, which names the op, group and rank
                raise RuntimeError(f"shared-memory receive timed out ({self.path})")
            if not select.select([self.ready], [], [], min(_POLL_S, left))[0] and not _alive(self.peer_pid):
                raise RuntimeError(f"remote process exited (pid {self.peer_pid}) before sending ({self.path})")


class _Flusher:
    """The thread that writes senders' backlogs as their receivers free slots (rare: only when a channel
    has more messages in flight than slots)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.waiting: list[_Sender] = []
        threading.Thread(target=self._loop, name="pipeline-shm-flush", daemon=True).start()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def register(self, senders: list[_Sender]) -> None:
        with self.cond:
            self.waiting.extend(senders)

    def _loop(self) -> None:
        while True:
            with self.cond:
                pending = [s for s in self.waiting if s.backlog]
                if not pending:
                    self.cond.wait()
                    continue
            select.select([s.free for s in pending], [], [], _POLL_S)
            for sender in pending:
                sender.flush()


_FLUSHER: Optional[_Flusher] = None
_FLUSHER_LOCK = threading.Lock()


def _flusher() -> _Flusher:
    global _FLUSHER
    with _FLUSHER_LOCK:
        if _FLUSHER is None:
            _FLUSHER = _Flusher()
        return _FLUSHER


class ShmPosted:
    """p2p.Posted's interface: wait(name) completes one op and returns the received tensor (None for a
    send, which completed when it was posted)."""

    def __init__(self, transport: "Transport", ops: dict[str, tuple], received: dict[str, torch.Tensor]):
        self.transport, self.ops, self.received = transport, ops, received

    def wait(self, name: str) -> Optional[torch.Tensor]:
        receiver, handle, group = self.ops.pop(name)
        if receiver is not None:
            collectives.tracked("recv", group, lambda: receiver.complete(handle, self.transport.timeout_s()))
        return self.received.pop(name, None)


class Transport:
    """The shared-memory channels of one rank to its pipeline neighbours, for one message size."""

    def __init__(self, senders: dict, receivers: dict, handle: object, name: str):
        self.senders, self.receivers, self.name = senders, receivers, name  # name: in the files' names
        self.handle = handle  # the pipeline group's ProcessGroup, kept alive so the cache key stays unique

    @staticmethod
    def timeout_s() -> float:
        return collectives.timeout_minutes() * 60.0

    def post(self, transfers: list[tuple[str, Optional[torch.Tensor], int, str, object]], shape: tuple[int, ...],
             dtype: torch.dtype, device: torch.device) -> ShmPosted:
        """transfers: (name, tensor to send or None to receive, peer global rank, 'act' | 'grad', group
        counted in comm_stats)."""
        ops, received = {}, {}
        for name, tensor, peer, direction, group in transfers:
            key = (peer, direction)
            if tensor is None:
                if key not in self.receivers:
                    raise RuntimeError(f"pipeline {name}: no shared-memory channel from rank {peer} (not a pipeline neighbour)")
                received[name] = torch.empty(shape, dtype=dtype, device=device)
                handle = [received[name], False]
                self.receivers[key].posted.append(handle)
                ops[name] = (self.receivers[key], handle, group)
                collectives.count(group, "recv", received[name].numel() * received[name].element_size())
            else:
                if key not in self.senders:
                    raise RuntimeError(f"pipeline {name}: no shared-memory channel to rank {peer} (not a pipeline neighbour)")
                self.senders[key].send(tensor.detach().contiguous().view(-1).view(torch.uint8))
                ops[name] = (None, None, group)
                collectives.count(group, "send", tensor.numel() * tensor.element_size())
        return ShmPosted(self, ops, received)


_TRANSPORTS: dict[tuple, Optional[Transport]] = {}


def _slots(nbytes: int, channels: int) -> int:
    """Slots per channel that fit the budget and this process's share of /dev/shm (0: none fit)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or max(1, torch.distributed.get_world_size())
    share = stat.f_bavail * stat.f_frsize // (2 * local_ranks)  # half of it, split over the host's ranks
    slots = min(MAX_SLOTS, max(1, RING_BUDGET_BYTES // nbytes), share // max(1, nbytes * channels))
    return max(0, slots)


def connect(groups: ProcessGroups, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            mode: str) -> Optional[Transport]:
    """This rank's shared-memory transport for messages of `shape`, or None where the process group's own
    p2p is used. Collective over the pipeline group on first use per (group, shape, dtype); every rank
    of the group decides alike. mode: --pipeline-p2p-transport (auto | shm | process-group)."""
    pp = groups.pp
    if mode == "process-group" or pp.size == 1:
        return None
    key = (id(pp.handle), pp.ranks, tuple(shape), dtype, device.type)
    if key in _TRANSPORTS:
        return _TRANSPORTS[key]
    me = pp.global_rank(pp.rank)
    peers = sorted({pp.global_rank((pp.rank + step) % pp.size) for step in (-1, 1)})
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    slots = _slots(nbytes, 2 * len(peers) * len(DIRECTIONS)) if device.type == "cpu" else 0
    everyone = collectives.all_gather_object((_host_id(), os.getpid(), slots, device.type), group=pp)
    pids = {pp.global_rank(i): pid for i, (_, pid, _, _) in enumerate(everyone)}
    reasons = []
    if len({host for host, _, _, _ in everyone}) > 1:
        reasons.append("the pipeline group spans several hosts")
    if any(kind != "cpu" for _, _, _, kind in everyone):
        reasons.append("its tensors are not on the CPU (NCCL has its own shared-memory path)")
    if min(s for _, _, s, _ in everyone) == 0:
        reasons.append(f"{SHM_DIR} has no room for a {nbytes}-byte message per channel")
    if reasons:
        if mode == "shm":
            raise ConfigError(f"--pipeline-p2p-transport shm: cannot use shared memory: {'; '.join(reasons)}. "
                              "Use --pipeline-p2p-transport auto (falls back to the process group's p2p).")
        _TRANSPORTS[key] = None
        return None
    slots = min(s for _, _, s, _ in everyone)
    run = collectives.broadcast_object(uuid.uuid4().hex[:12] if pp.rank == 0 else None, src=pp.first, group=pp)
    path = lambda src, dst, direction: os.path.join(SHM_DIR, f"megatron_lite-p2p-{run}-{src}-{dst}-{direction}")  # noqa: E731
    senders = {(peer, d): _Sender(path(me, peer, d), slots, nbytes, True) for peer in peers for d in DIRECTIONS}
    collectives.barrier(pp)  # every channel exists
    receivers = {(peer, d): _Receiver(path(peer, me, d), slots, nbytes, False, peer_pid=pids[peer])
                 for peer in peers for d in DIRECTIONS}
    collectives.barrier(pp)  # every channel is open at both ends: the names can go
    for sender in senders.values():
        sender.unlink()
    _flusher().register(list(senders.values()))
    _TRANSPORTS[key] = Transport(senders, receivers, pp.handle, f"megatron_lite-p2p-{run}-")
    return _TRANSPORTS[key]
