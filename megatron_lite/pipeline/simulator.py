"""Execute every rank's action list in one process, with time but without tensors.

`check_schedules` proves a set of action lists is executable: every op has a partner carrying the same
tensor (matched first-in first-out per channel, as torch.distributed matches p2p messages), no rank waits
forever (deadlock-free by construction) and each rank's local order is sound. `simulate` gives each
rank's idle fraction (the pipeline bubble) for given forward/backward times, which the bubble benchmark
sets beside the measured and the theoretical (p - 1) / (v m).

The model of communication is the strict one: an exchange completes only once every one of its ops has
been posted by the peer as well (rendezvous), and a rank does nothing else while it waits. A schedule
that passes here also runs with eager (buffered) sends.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from megatron_lite.pipeline.schedules import (RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD, Action,
                                              Backward, Exchange, FinalizeGrads, Forward, P2POp)


class ScheduleError(AssertionError):
    """An action list that would deadlock, mismatch tensors or break forward-before-backward."""


@dataclass
class Timeline:
    step_time: float
    busy: list[float]
    finish: list[float]

    @property
    def idle_fraction(self) -> list[float]:
        return [1.0 - busy / self.step_time for busy in self.busy]


def message(op: P2POp, pp_rank: int, pp_size: int) -> tuple[tuple[int, int, str], tuple]:
    """(channel, identity) of a p2p op: channel = (src rank, dst rank, 'act'|'grad'); identity names the
    tensor (sending virtual stage, receiving virtual stage, micro-batch) so both ends can be compared."""
    stage = op.chunk * pp_size + pp_rank
    if op.kind == SEND_FORWARD:
        src, dst, direction = stage, stage + 1, "act"
    elif op.kind == RECV_FORWARD:
        src, dst, direction = stage - 1, stage, "act"
    elif op.kind == SEND_BACKWARD:
        src, dst, direction = stage, stage - 1, "grad"
    elif op.kind == RECV_BACKWARD:
        src, dst, direction = stage + 1, stage, "grad"
    else:
        raise ScheduleError(f"unknown p2p op {op.kind!r}")
    return (src % pp_size, dst % pp_size, direction), (src, dst, op.microbatch)


def check_local_order(actions: list[Action], pp_rank: int, pp_size: int, num_chunks: int, num_microbatches: int,
                      forward_only: bool = False) -> None:
    """One rank's list: each (chunk, micro-batch) forwarded once and (unless forward_only) backwarded once,
    after its forward; inputs received before use, results sent after they exist."""
    done: dict[tuple[str, int, int], int] = {}
    last_stage = pp_size * num_chunks - 1
    for index, action in enumerate(actions):
        if isinstance(action, (Forward, Backward)):
            kind = "F" if isinstance(action, Forward) else "B"
            key = (kind, action.chunk, action.microbatch)
            if key in done:
                raise ScheduleError(f"rank {pp_rank}: {action} runs twice")
            if kind == "B" and ("F", action.chunk, action.microbatch) not in done:
                raise ScheduleError(f"rank {pp_rank}: {action} before its forward")
            stage = action.chunk * pp_size + pp_rank
            needs = ("recv_forward" if kind == "F" and stage > 0 else
                     "recv_backward" if kind == "B" and stage < last_stage else None)
            if needs and (needs, action.chunk, action.microbatch) not in done:
                raise ScheduleError(f"rank {pp_rank}: {action} before its {needs}")
            done[key] = index
        elif isinstance(action, Exchange):
            for op in action.ops:
                if op.kind in (SEND_FORWARD, SEND_BACKWARD):
                    source = ("F" if op.kind == SEND_FORWARD else "B", op.chunk, op.microbatch)
                    if source not in done:
                        raise ScheduleError(f"rank {pp_rank}: {op} before the compute that produces it")
                if (op.kind, op.chunk, op.microbatch) in done:
                    raise ScheduleError(f"rank {pp_rank}: {op} twice")
                done[(op.kind, op.chunk, op.microbatch)] = index
    expected = {("F", c, m) for c in range(num_chunks) for m in range(num_microbatches)}
    if not forward_only:
        expected |= {("B", c, m) for c in range(num_chunks) for m in range(num_microbatches)}
    computed = {key for key in done if key[0] in ("F", "B")}
    if computed != expected:
        raise ScheduleError(f"rank {pp_rank}: missing {sorted(expected - computed)[:4]}, extra {sorted(computed - expected)[:4]}")


def simulate_timeline(schedules: list[list[Action]], forward_time: float = 1.0, backward_time: float = 2.0,
                      finalize_time: float = 0.0) -> Timeline:
    """Run all ranks' lists with compute costs and zero-cost rendezvous communication; raises
    ScheduleError on a mismatched message or a deadlock."""
    pp_size = len(schedules)
    position = [0] * pp_size
    clock = [0.0] * pp_size
    busy = [0.0] * pp_size
    posted: list[bool] = [False] * pp_size
    # channel -> queue of (identity, post time) not yet matched, for sends and receives separately
    sends: dict[tuple, deque] = defaultdict(deque)
    recvs: dict[tuple, deque] = defaultdict(deque)
    # per rank: the ops of its current exchange still waiting for a partner, and the latest partner time
    pending: list[dict[int, float]] = [dict() for _ in range(pp_size)]
    ready_at = [0.0] * pp_size

    def post(rank: int, exchange: Exchange) -> None:
        for op_index, op in enumerate(exchange.ops):
            channel, identity = message(op, rank, pp_size)
            is_send = op.kind in (SEND_FORWARD, SEND_BACKWARD)
            mine, theirs = (sends, recvs) if is_send else (recvs, sends)
            if theirs[channel]:
                partner_identity, partner_time, partner_rank, partner_index = theirs[channel].popleft()
                if partner_identity != identity:
                    raise ScheduleError(f"mismatch on channel {channel}: rank {rank} {op} carries {identity}, "
                                        f"rank {partner_rank} expects {partner_identity}")
                when = max(partner_time, clock[rank])
                ready_at[rank] = max(ready_at[rank], when)
                ready_at[partner_rank] = max(ready_at[partner_rank], when)
                pending[partner_rank].pop(partner_index)
            else:
                mine[channel].append((identity, clock[rank], rank, (rank, op_index)))
                pending[rank][(rank, op_index)] = clock[rank]

    progress = True
    while progress:
        progress = False
        for rank in range(pp_size):
            while position[rank] < len(schedules[rank]):
                action = schedules[rank][position[rank]]
                if isinstance(action, Exchange):
                    if not posted[rank]:
                        posted[rank] = True
                        ready_at[rank] = clock[rank]
                        post(rank, action)
                        progress = True
                    if pending[rank]:
                        break  # blocked until the partners post
                    clock[rank] = max(clock[rank], ready_at[rank])
                    posted[rank] = False
                else:
                    cost = (forward_time if isinstance(action, Forward) else
                            backward_time if isinstance(action, Backward) else
                            finalize_time if isinstance(action, FinalizeGrads) else 0.0)
                    clock[rank] += cost
                    busy[rank] += cost
                position[rank] += 1
                progress = True
    stuck = [rank for rank in range(pp_size) if position[rank] < len(schedules[rank])]
    if stuck:
        where = {rank: schedules[rank][position[rank]] for rank in stuck}
        raise ScheduleError(f"deadlock: ranks {stuck} wait forever at {where}")
    leftover = {ch: list(q) for ch, q in list(sends.items()) + list(recvs.items()) if q}
    if leftover:
        raise ScheduleError(f"unmatched messages: {leftover}")
    step_time = max(clock) if clock else 0.0
    return Timeline(step_time=step_time, busy=busy, finish=list(clock))


def simulate(schedules: list[list[Action]], forward_time: float = 1.0, backward_time: float = 2.0) -> list[float]:
    """Per-rank idle fraction (idle time / step time) of a set of action lists."""
    return simulate_timeline(schedules, forward_time, backward_time).idle_fraction


def max_in_flight(actions: list[Action]) -> int:
    """Most (chunk, micro-batch) pairs whose forward has run and backward has not, at any point."""
    alive = peak = 0
    for action in actions:
        if isinstance(action, Forward):
            alive += 1
            peak = max(peak, alive)
        elif isinstance(action, Backward):
            alive -= 1
    return peak


def check_schedules(schedules: list[list[Action]], num_chunks: int, num_microbatches: int,
                    forward_only: bool = False) -> Timeline:
    """Everything a schedule promises, for all ranks at once; returns the unit-cost timeline."""
    for rank, actions in enumerate(schedules):
        check_local_order(actions, rank, len(schedules), num_chunks, num_microbatches, forward_only)
    return simulate_timeline(schedules)
