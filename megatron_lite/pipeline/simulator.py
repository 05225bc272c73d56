"""Execute every rank's action list in one process, with time but without tensors.

`check_schedules` proves a set of action lists is executable: every op has a partner carrying the same
tensor (matched first-in first-out per channel, as torch.distributed matches p2p messages), no rank waits
forever (deadlock-free by construction) and each rank's local order is sound. `simulate` gives each
rank's idle fraction (the pipeline bubble) for given forward/backward times, which the bubble benchmark
sets beside the measured and the theoretical (p - 1) / (v m).

The model of communication is the strict one: an op completes only once its partner has been posted by
the peer as well (rendezvous), and a rank does nothing else while it waits. An `Exchange` is a `Post` of
its ops immediately followed by a `Wait` for all of them; with --overlap-p2p-comm posted ops stay in
flight while the rank computes, and only a `Wait` blocks. A schedule that passes here also runs with
eager (buffered) sends.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Optional

from megatron_lite.pipeline.actions import (RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD, Action, Backward,
                                            Exchange, FinalizeGrads, Forward, P2POp, Post, Wait, WeightGrad, op_stages,
                                            stage_rank, virtual_stage)


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
    """(channel, identity) of a p2p op: channel = (src rank, dst rank, group) as p2p.py matches messages
    (activations and gradients on separate groups at PP = 2 and between a rank and itself at ZB-V's turn,
    one group otherwise); identity names the tensor (sending virtual stage, receiving virtual stage,
    micro-batch) so both ends can be compared."""
    if op.kind not in (SEND_FORWARD, RECV_FORWARD, SEND_BACKWARD, RECV_BACKWARD):
        raise ScheduleError(f"unknown p2p op {op.kind!r}")
    src, dst = op_stages(op, pp_size, pp_rank)
    src_rank, dst_rank = stage_rank(pp_size, src, op.v_shape), stage_rank(pp_size, dst, op.v_shape)
    direction = "act" if op.kind in (SEND_FORWARD, RECV_FORWARD) else "grad"
    group = direction if pp_size == 2 or src_rank == dst_rank else "pp"
    return (src_rank, dst_rank, group), (src, dst, op.microbatch)


def check_local_order(actions: list[Action], pp_rank: int, pp_size: int, num_chunks: int, num_microbatches: int,
                      forward_only: bool = False) -> None:
    """One rank's list: each (chunk, micro-batch) forwarded once and (unless forward_only) backwarded once,
    after its forward; inputs received before use, results sent after they exist."""
    done: dict[tuple[str, int, int], int] = {}
    posted: set[tuple[str, int, int]] = set()
    last_stage = pp_size * num_chunks - 1
    v_shape = any(op.v_shape for action in actions if isinstance(action, (Exchange, Post, Wait)) for op in action.ops)
    for index, action in enumerate(actions):
        if isinstance(action, WeightGrad):
            _check_weight_grad(action, pp_rank, index, done, actions)
        elif isinstance(action, (Forward, Backward)):
            kind = "F" if isinstance(action, Forward) else "B"
            key = (kind, action.chunk, action.microbatch)
            if key in done:
                raise ScheduleError(f"rank {pp_rank}: {action} runs twice")
            if kind == "B" and ("F", action.chunk, action.microbatch) not in done:
                raise ScheduleError(f"rank {pp_rank}: {action} before its forward")
            stage = virtual_stage(pp_size, pp_rank, action.chunk, v_shape)
            needs = ("recv_forward" if kind == "F" and stage > 0 else
                     "recv_backward" if kind == "B" and stage < last_stage else None)
            if needs and (needs, action.chunk, action.microbatch) not in done:
                raise ScheduleError(f"rank {pp_rank}: {action} before its {needs}")
            done[key] = index
        elif isinstance(action, (Exchange, Post, Wait)):
            _check_p2p(action, pp_rank, index, done, posted)
    if posted:
        raise ScheduleError(f"rank {pp_rank}: posted but never waited for: {sorted(posted)[:4]}")
    expected = {("F", c, m) for c in range(num_chunks) for m in range(num_microbatches)}
    if not forward_only:
        expected |= {("B", c, m) for c in range(num_chunks) for m in range(num_microbatches)}
    deferred = {("W", a.chunk, a.microbatch) for a in actions if isinstance(a, Backward) and a.defer_wgrad}
    if deferred != {key for key in done if key[0] == "W"}:
        raise ScheduleError(f"rank {pp_rank}: deferred weight gradients without a W: {sorted(deferred - set(done))[:4]}")
    computed = {key for key in done if key[0] in ("F", "B")}
    if computed != expected:
        raise ScheduleError(f"rank {pp_rank}: missing {sorted(expected - computed)[:4]}, extra {sorted(computed - expected)[:4]}")


def _check_weight_grad(action: WeightGrad, pp_rank: int, index: int, done: dict, actions: list) -> None:
    """A W runs once, after its B, and only for a B that deferred its weight gradients."""
    key = ("W", action.chunk, action.microbatch)
    b_index = done.get(("B", action.chunk, action.microbatch))
    if b_index is None or not actions[b_index].defer_wgrad:
        raise ScheduleError(f"rank {pp_rank}: {action} without a preceding Backward(defer_wgrad=True)")
    if key in done:
        raise ScheduleError(f"rank {pp_rank}: {action} runs twice")
    done[key] = index


def _check_p2p(action, pp_rank: int, index: int, done: dict, posted: set) -> None:
    """A send is posted after the compute producing it; every op is posted once and waited for once; a
    receive's data counts as there (in `done`) once it has been waited for."""
    for op in action.ops:
        key = (op.kind, op.chunk, op.microbatch)
        if not isinstance(action, Wait):
            if op.kind in (SEND_FORWARD, SEND_BACKWARD):
                source = ("F" if op.kind == SEND_FORWARD else "B", op.chunk, op.microbatch)
                if source not in done:
                    raise ScheduleError(f"rank {pp_rank}: {op} before the compute that produces it")
            if key in done or key in posted:
                raise ScheduleError(f"rank {pp_rank}: {op} twice")
            posted.add(key)
        elif key not in posted:
            raise ScheduleError(f"rank {pp_rank}: waits for {op}, which it has not posted")
        if not isinstance(action, Post):
            posted.discard(key)
            done[key] = index


def expand_exchanges(actions: list[Action]) -> list[Action]:
    """An Exchange is a Post of its ops and an immediate Wait for all of them."""
    out: list[Action] = []
    for action in actions:
        out.extend([Post(action.ops), Wait(action.ops)] if isinstance(action, Exchange) else [action])
    return out


def simulate_timeline(schedules: list[list[Action]], forward_time: float = 1.0, backward_time: float = 2.0,
                      finalize_time: float = 0.0, p2p_time: float = 0.0,
                      weight_time: Optional[float] = None) -> Timeline:
    """Run all ranks' lists with compute costs and rendezvous communication (an op completes p2p_time after
    both ends have posted it); raises ScheduleError on a mismatched message or a deadlock. A split
    backward costs backward_time - weight_time (B) plus weight_time (W; default half the backward)."""
    sim = _Simulation([expand_exchanges(actions) for actions in schedules], p2p_time)
    weight_time = backward_time / 2 if weight_time is None else weight_time
    costs = {Forward: forward_time, Backward: backward_time, FinalizeGrads: finalize_time, WeightGrad: weight_time}
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(sim.schedules):
            while sim.position[rank] < len(actions):
                action = actions[sim.position[rank]]
                if isinstance(action, Post):
                    sim.post(rank, action.ops)
                elif isinstance(action, Wait):
                    times = [sim.matched[rank][sim.key(op)] for op in action.ops]
                    if any(t is None for t in times):
                        break  # blocked until the partners post
                    sim.clock[rank] = max([sim.clock[rank], *times])
                    for op in action.ops:
                        del sim.matched[rank][sim.key(op)]
                else:
                    cost = costs.get(type(action), 0.0)
                    if isinstance(action, Backward) and action.defer_wgrad:
                        cost -= weight_time
                    sim.clock[rank] += cost
                    sim.busy[rank] += cost
                sim.position[rank] += 1
                progress = True
    sim.check_finished()
    return Timeline(step_time=max(sim.clock) if sim.clock else 0.0, busy=sim.busy, finish=list(sim.clock))


class _Simulation:
    """Per-rank position and clock; posted ops matched first-in first-out per channel."""

    def __init__(self, schedules: list[list[Action]], p2p_time: float = 0.0):
        self.schedules, self.pp_size, self.p2p_time = schedules, len(schedules), p2p_time
        self.position = [0] * self.pp_size
        self.clock = [0.0] * self.pp_size
        self.busy = [0.0] * self.pp_size
        # channel -> queue of (identity, post time, rank, op key) not yet matched, sends and receives apart
        self.sends: dict[tuple, deque] = defaultdict(deque)
        self.recvs: dict[tuple, deque] = defaultdict(deque)
        # per rank: posted op -> time it was matched (None while the partner has not posted)
        self.matched: list[dict[tuple, object]] = [dict() for _ in range(self.pp_size)]

    @staticmethod
    def key(op: P2POp) -> tuple:
        return (op.kind, op.chunk, op.microbatch)

    def post(self, rank: int, ops: tuple) -> None:
        for op in ops:
            channel, identity = message(op, rank, self.pp_size)
            mine, theirs = (self.sends, self.recvs) if op.kind in (SEND_FORWARD, SEND_BACKWARD) else (self.recvs, self.sends)
            if theirs[channel]:
                partner_identity, partner_time, partner_rank, partner_key = theirs[channel].popleft()
                if partner_identity != identity:
                    raise ScheduleError(f"mismatch on channel {channel}: rank {rank} {op} carries {identity}, "
                                        f"rank {partner_rank} expects {partner_identity}")
                when = max(partner_time, self.clock[rank]) + self.p2p_time
                self.matched[rank][self.key(op)] = when
                self.matched[partner_rank][partner_key] = when
            else:
                mine[channel].append((identity, self.clock[rank], rank, self.key(op)))
                self.matched[rank][self.key(op)] = None

    def check_finished(self) -> None:
        stuck = [rank for rank in range(self.pp_size) if self.position[rank] < len(self.schedules[rank])]
        if stuck:
            where = {rank: self.schedules[rank][self.position[rank]] for rank in stuck}
            raise ScheduleError(f"deadlock: ranks {stuck} wait forever at {where}")
        leftover = {ch: list(q) for ch, q in list(self.sends.items()) + list(self.recvs.items()) if q}
        if leftover:
            raise ScheduleError(f"unmatched messages: {leftover}")


def simulate(schedules: list[list[Action]], forward_time: float = 1.0, backward_time: float = 2.0,
             p2p_time: float = 0.0, weight_time: Optional[float] = None) -> list[float]:
    """Per-rank idle fraction (idle time / step time) of a set of action lists."""
    return simulate_timeline(schedules, forward_time, backward_time, p2p_time=p2p_time,
                             weight_time=weight_time).idle_fraction


def max_in_flight(actions: list[Action]) -> int:
    """Most (chunk, micro-batch) pairs whose forward has run and backward has not, at any point (with a
    split backward, until its W: W still reads the layer inputs)."""
    alive = peak = 0
    for action in actions:
        if isinstance(action, Forward):
            alive += 1
            peak = max(peak, alive)
        elif isinstance(action, WeightGrad) or (isinstance(action, Backward) and not action.defer_wgrad):
            alive -= 1
    return peak


def check_schedules(schedules: list[list[Action]], num_chunks: int, num_microbatches: int,
                    forward_only: bool = False) -> Timeline:
    """Everything a schedule promises, for all ranks at once; returns the unit-cost timeline."""
    for rank, actions in enumerate(schedules):
        check_local_order(actions, rank, len(schedules), num_chunks, num_microbatches, forward_only)
    return simulate_timeline(schedules)
