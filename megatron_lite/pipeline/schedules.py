"""Pipeline schedules as data: each schedule is a list of actions for one pipeline rank.

A schedule is a pure function of (pp_size, pp_rank, num_model_chunks, num_microbatches) that returns the
ordered actions that rank performs: run the forward or backward of model chunk c on micro-batch m, or
exchange tensors with the neighbouring stages. One runner (`runner.py`) executes any such list, so the
order can be tested in one process (`simulator.py` checks sends against receives across ranks and
computes each schedule's bubble) without any communication (DeepSpeed's pipe/schedule.py idea).

Schedules (Megatron-LM's names and warm-up counts):
- no pipelining: forward, backward per micro-batch (gradient accumulation), PP = 1;
- GPipe: every forward, then every backward;
- 1F1B (PipeDream-flush): warm-up forwards, steady one-forward-one-backward, cool-down backwards;
- ZB-H1 (zero bubble, Qi et al. 2024): 1F1B with each backward split into B (input grad) and a
  deferred W (weight grads), W's placed where 1F1B idles;
- interleaved 1F1B: the same over virtual stages (chunk v on rank r is virtual stage v x PP + r), in
  groups of G >= PP micro-batches per chunk (--microbatch-group-size-per-virtual-pipeline-stage, default
  PP); any m >= G works;
- ZB-V (Qi et al. 2024): two chunks per rank placed as a V (virtual_stage), split backward, near-zero
  bubble at 1F1B's activation memory; any m.

Communication actions name the tensor they carry by (direction, chunk, micro-batch) of the *local* rank:
`send_forward(c, m)` sends the output of chunk c's forward of m to the next virtual stage;
`recv_forward(c, m)` receives chunk c's input for m; `send_backward`/`recv_backward` carry the
gradients the other way (the actions are defined in actions.py). Ops of one `Exchange` are started
together (batched) and waited on together; with --overlap-p2p-comm (overlap.py) they are split into
`Post` and `Wait` actions instead, so a transfer runs while the rank computes.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_lite.errors import ConfigError
from megatron_lite.pipeline.actions import (RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD, Action, Backward,
                                            Exchange, FinalizeGrads, Forward, P2POp, WeightGrad, op_stages, stage_rank,
                                            virtual_stage)
from megatron_lite.pipeline.overlap import overlap_p2p

@dataclass
class _Builder:
    """Collects a rank's actions; drops p2p ops that have no peer (the first virtual stage receives no
    activations, the last sends none) so the schedules can be written without special cases."""
    pp_size: int
    pp_rank: int
    num_chunks: int
    actions: list = field(default_factory=list)
    v_shape: bool = False

    def virtual_stage(self, chunk: int) -> int:
        return virtual_stage(self.pp_size, self.pp_rank, chunk, self.v_shape)

    def has_peer(self, op: P2POp) -> bool:
        stage = self.virtual_stage(op.chunk)
        if op.kind in (SEND_FORWARD, RECV_BACKWARD):
            return stage < self.pp_size * self.num_chunks - 1
        return stage > 0

    def forward(self, chunk: int, microbatch: int) -> None:
        self.actions.append(Forward(chunk, microbatch))

    def backward(self, chunk: int, microbatch: int) -> None:
        self.actions.append(Backward(chunk, microbatch))

    def exchange(self, *ops: Optional[P2POp]) -> None:
        kept = tuple(op for op in ops if op is not None and self.has_peer(op))
        if kept:
            self.actions.append(Exchange(kept))

    def finish(self, forward_only: bool) -> list[Action]:
        if forward_only:
            return self.actions
        return mark_sync_grads(self.actions) + [FinalizeGrads()]


def mark_sync_grads(actions: list[Action]) -> list[Action]:
    """Mark the last Backward (and the last WeightGrad) of each chunk as the one that syncs grads."""
    actions = list(actions)
    seen: set[tuple[type, int]] = set()
    for index in range(len(actions) - 1, -1, -1):
        action = actions[index]
        if isinstance(action, (Backward, WeightGrad)) and (type(action), action.chunk) not in seen:
            seen.add((type(action), action.chunk))
            actions[index] = dataclasses.replace(action, sync_grads=True)
        elif isinstance(action, (Backward, WeightGrad)) and action.sync_grads:
            actions[index] = dataclasses.replace(action, sync_grads=False)
    return actions


def _op(kind: str, chunk: int, microbatch: int) -> P2POp:
    return P2POp(kind, chunk, microbatch)


# ---- the schedules -------------------------------------------------------------------------------
def no_pipelining_schedule(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                           forward_only: bool = False) -> list[Action]:
    """Gradient accumulation: forward then backward of each micro-batch in turn (PP = 1)."""
    if pp_size != 1 or num_chunks != 1:
        raise ConfigError("--pipeline-model-parallel-size: the no-pipelining schedule needs PP = 1 and no virtual stages.")
    b = _Builder(1, 0, 1)
    for mb in range(num_microbatches):
        b.forward(0, mb)
        if not forward_only:
            b.backward(0, mb)
    return b.finish(forward_only)


def gpipe_schedule(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                   forward_only: bool = False) -> list[Action]:
    """GPipe: all forwards, then all backwards. Every micro-batch's activations are alive at the peak."""
    if num_chunks != 1:
        raise ConfigError("--pipeline-schedule gpipe: does not support virtual stages. Use interleaved (or auto).")
    b = _Builder(pp_size, pp_rank, 1)
    for mb in range(num_microbatches):
        b.exchange(_op(RECV_FORWARD, 0, mb))
        b.forward(0, mb)
        b.exchange(_op(SEND_FORWARD, 0, mb))
    if not forward_only:
        for mb in range(num_microbatches):
            b.exchange(_op(RECV_BACKWARD, 0, mb))
            b.backward(0, mb)
            b.exchange(_op(SEND_BACKWARD, 0, mb))
    return b.finish(forward_only)


def _warm_up(b: "_Builder", num_warmup: int, num_steady: int) -> None:
    """1F1B's warm-up (ZB-H1's too): forwards only, then the receive of the first steady-state forward."""
    for mb in range(num_warmup):
        b.exchange(_op(RECV_FORWARD, 0, mb))
        b.forward(0, mb)
        b.exchange(_op(SEND_FORWARD, 0, mb))
    if num_steady > 0:
        b.exchange(_op(RECV_FORWARD, 0, num_warmup))


def one_f_one_b_schedule(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                         forward_only: bool = False) -> list[Action]:
    """1F1B (PipeDream-flush), as in Megatron's forward_backward_pipelining_without_interleaving.

    Warm-up: rank r runs PP - r - 1 forwards, so at most PP - r micro-batches are ever in flight.
    Steady state: one forward, one backward; the send of each result is batched with the receive of the
    next input from the other direction. Cool-down: the remaining backwards.
    """
    if num_chunks != 1:
        raise ConfigError("--pipeline-schedule 1f1b: does not support virtual stages. Use interleaved (or auto).")
    b = _Builder(pp_size, pp_rank, 1)
    m = num_microbatches
    num_warmup = min(pp_size - pp_rank - 1, m)
    num_steady = m - num_warmup

    _warm_up(b, num_warmup, num_steady)
    # Steady state: forward of micro-batch num_warmup + i, backward of micro-batch i.
    for i in range(num_steady):
        forward_mb, backward_mb, last = num_warmup + i, i, i == num_steady - 1
        b.forward(0, forward_mb)
        if forward_only:
            b.exchange(_op(SEND_FORWARD, 0, forward_mb), None if last else _op(RECV_FORWARD, 0, forward_mb + 1))
            continue
        b.exchange(_op(SEND_FORWARD, 0, forward_mb), _op(RECV_BACKWARD, 0, backward_mb))
        b.backward(0, backward_mb)
        b.exchange(_op(SEND_BACKWARD, 0, backward_mb), None if last else _op(RECV_FORWARD, 0, forward_mb + 1))

    # Cool-down: backwards of the warm-up micro-batches.
    if not forward_only:
        for mb in range(num_steady, m):
            b.exchange(_op(RECV_BACKWARD, 0, mb))
            b.backward(0, mb)
            b.exchange(_op(SEND_BACKWARD, 0, mb))
    return b.finish(forward_only)


def zb_h1_schedule(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                   forward_only: bool = False) -> list[Action]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, section 3.1): 1F1B's order and
    warm-up, with each backward split into B (input gradient, on the critical path: its result is sent
    upstream at once) and W (weight gradients). Rank r runs each W r steps after its B and the last r W's
    after its last B, where it would wait for the upstream ranks anyway; at most PP micro-batches are in
    flight (forward run, W not yet) on any rank, 1F1B's peak. Bubble per rank: (PP - 1)(F + B - W),
    against 1F1B's (PP - 1)(F + B + W) (the paper's formulas; a third when F = B = W). The simulator
    reproduces it exactly with --overlap-p2p-comm; blocking exchanges couple neighbours and add up to
    (PP - 1) W more.
    """
    if num_chunks != 1:
        raise ConfigError("--pipeline-schedule zb-h1: does not support virtual stages (one chunk per rank). "
                          "Drop --num-layers-per-virtual-pipeline-stage, or use zbv (two chunks per rank) or interleaved.")
    if forward_only:
        return one_f_one_b_schedule(pp_size, pp_rank, num_chunks, num_microbatches, forward_only)
    b = _Builder(pp_size, pp_rank, 1)
    m = num_microbatches
    num_warmup = min(pp_size - pp_rank - 1, m)
    num_steady = m - num_warmup
    delay = pp_rank  # W's held back: the in-flight count stays <= PP (1F1B's peak, rank 0's)
    pending_w: list[int] = []

    def backward_then_w(mb: int, recv_next: Optional[P2POp], keep: int) -> None:
        b.actions.append(Backward(0, mb, defer_wgrad=True))
        b.exchange(_op(SEND_BACKWARD, 0, mb), recv_next)
        pending_w.append(mb)
        while len(pending_w) > keep:
            b.actions.append(WeightGrad(0, pending_w.pop(0)))

    _warm_up(b, num_warmup, num_steady)
    for i in range(num_steady):
        forward_mb, last = num_warmup + i, i == num_steady - 1
        b.forward(0, forward_mb)
        b.exchange(_op(SEND_FORWARD, 0, forward_mb), _op(RECV_BACKWARD, 0, i))
        backward_then_w(i, None if last else _op(RECV_FORWARD, 0, forward_mb + 1), delay)
    for mb in range(num_steady, m):
        b.exchange(_op(RECV_BACKWARD, 0, mb))
        backward_then_w(mb, None, delay)
    while pending_w:
        b.actions.append(WeightGrad(0, pending_w.pop(0)))
    return b.finish(forward_only)


def interleaved_1f1b_schedule(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                              forward_only: bool = False, group_size: Optional[int] = None) -> list[Action]:
    """Interleaved 1F1B, as in Megatron's forward_backward_pipelining_with_interleaving (no p2p overlap).

    Micro-batches go through each chunk in groups of G = --microbatch-group-size-per-virtual-pipeline-stage
    (default PP): the k-th forward is entry k of schedule_table (group by group, chunk by chunk; the last
    group takes the remaining micro-batches, so m need not be a multiple of PP). Backwards run the chunks
    in reverse order. Warm-up is 2 (PP - r - 1) + (VP - 1) G forwards (all of them when there are only PP
    micro-batches). Every step exchanges with both neighbours in one batch.
    """
    group_size = check_interleaving(pp_size, num_chunks, num_microbatches, group_size)
    plan = _Interleaved(pp_size, pp_rank, num_chunks, num_microbatches, forward_only, group_size)
    plan.warmup()
    plan.steady()
    if not forward_only:
        plan.cooldown()
    return plan.b.finish(forward_only)


class _Interleaved:
    """The three phases of interleaved 1F1B for one rank, sharing the order of forwards and backwards."""

    def __init__(self, pp: int, pp_rank: int, v: int, m: int, forward_only: bool, group_size: int):
        self.pp, self.v, self.forward_only = pp, v, forward_only
        self.b = _Builder(pp, pp_rank, v)
        self.total = m * v
        self.table = schedule_table(m, v, group_size)
        if forward_only:
            self.num_warmup, self.all_warmup = self.total, False
        elif m == pp:
            self.num_warmup, self.all_warmup = self.total, True
        else:
            # Megatron's 2 (PP - r - 1) + (VP - 1) G, with G the largest group (the last one takes the
            # remainder), so each backward finds its forward done.
            largest_group = max(last - first for first, last in microbatch_groups(m, group_size))
            self.num_warmup = min(2 * (pp - pp_rank - 1) + (v - 1) * largest_group, self.total)
            self.all_warmup = False
        self.num_steady = self.total - self.num_warmup
        self.first_rank, self.last_rank = pp_rank == 0, pp_rank == pp - 1
        # Each chunk consumes its inputs and output grads in micro-batch order, so the micro-batch a receive
        # carries is the next one not yet received for that chunk.
        self.received_inputs, self.received_grads = [0] * v, [0] * v

    def chunk_of(self, k: int, forward: bool) -> int:
        chunk = self.table[k][1]
        return chunk if forward else self.v - chunk - 1

    def microbatch_of(self, k: int) -> int:
        return self.table[k][0]

    def recv_forward(self, chunk: int) -> Optional[P2POp]:
        op = _op(RECV_FORWARD, chunk, self.received_inputs[chunk])
        if not self.b.has_peer(op):  # virtual stage 0 has no one to receive from
            return None
        self.received_inputs[chunk] += 1
        return op

    def recv_backward(self, chunk: int) -> Optional[P2POp]:
        op = _op(RECV_BACKWARD, chunk, self.received_grads[chunk])
        if not self.b.has_peer(op):  # the last virtual stage starts backward from its loss
            return None
        self.received_grads[chunk] += 1
        return op

    def send_forward(self, k: int) -> P2POp:
        return _op(SEND_FORWARD, self.chunk_of(k, True), self.microbatch_of(k))

    def send_backward(self, k: int) -> P2POp:
        return _op(SEND_BACKWARD, self.chunk_of(k, False), self.microbatch_of(k))

    def warmup(self) -> None:
        """Forwards only; after each, send its output and receive the next forward's input."""
        b = self.b
        b.exchange(self.recv_forward(0))
        for k in range(self.num_warmup):
            b.forward(self.chunk_of(k, True), self.microbatch_of(k))
            recv_first_grad = None
            if k == self.num_warmup - 1 and not self.forward_only and not self.all_warmup:
                recv_first_grad = self.recv_backward(self.v - 1)  # the steady state starts with the last chunk's backward
            b.exchange(self.send_forward(k), self.next_input(k), recv_first_grad)

    def steady(self) -> None:
        """One forward and one backward, then one exchange with both neighbours."""
        for k in range(self.num_steady):
            forward_k, backward_k = k + self.num_warmup, k
            self.b.forward(self.chunk_of(forward_k, True), self.microbatch_of(forward_k))
            self.b.backward(self.chunk_of(backward_k, False), self.microbatch_of(backward_k))
            self.b.exchange(self.send_forward(forward_k), self.next_input(forward_k),
                            self.send_backward(backward_k), self.next_grad(backward_k))

    def next_input(self, k: int) -> Optional[P2POp]:
        """The receive in the exchange after forward k. Every rank but the first receives the input of
        its forward k + 1 (sent by the previous rank after its forward k + 1). The first rank is PP - 1
        forwards ahead of the last rank: it receives what the last rank sends after forward k - (PP - 1)."""
        if not self.first_rank:
            return self.recv_forward(self.chunk_of(k + 1, True)) if k + 1 < self.total else None
        if k < self.pp - 1:
            return None
        sender_chunk = self.chunk_of(k - (self.pp - 1), True)
        return self.recv_forward(sender_chunk + 1) if sender_chunk != self.v - 1 else None

    def next_grad(self, k: int) -> Optional[P2POp]:
        """The receive in the exchange after backward k: the same rule mirrored (the last rank is PP - 1
        backwards ahead of the first)."""
        if not self.last_rank:
            return self.recv_backward(self.chunk_of(k + 1, False)) if k + 1 < self.total else None
        if k < self.pp - 1:
            return None
        sender_chunk = self.chunk_of(k - (self.pp - 1), False)
        return self.recv_backward(sender_chunk - 1) if sender_chunk != 0 else None

    def cooldown(self) -> None:
        """The remaining backwards."""
        if self.all_warmup:
            self.b.exchange(self.recv_backward(self.v - 1))
        for k in range(self.num_steady, self.total):
            self.b.backward(self.chunk_of(k, False), self.microbatch_of(k))
            self.b.exchange(self.send_backward(k), self.next_grad(k))


def zbv_schedule(pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                 forward_only: bool = False) -> list[Action]:
    """ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, section 6; the V family of "Pipeline
    Parallelism with Controllable Memory", NeurIPS 2024): 2 PP virtual stages placed as a V (virtual_stage:
    rank r holds stages r and 2 PP - 1 - r, so rank 0 holds the first and the last stage, computes the loss
    and keeps tied embeddings local), each backward split into B and W. Each rank's compute order is the
    paper's (as PyTorch's ScheduleZBVZeroBubble writes it, _zbv_order): 2 (PP - r) - 1 forwards of chunk 0,
    r pairs F1 F0, PP - r triples F1 B1 W1, then F0 B0 W0 F1 B1 W1 until the forwards run out, then the
    cool-down Bs with the deferred Ws last. With m < 2 PP - 1 the missing micro-batches' actions are left out.

    Bubble (T_F, T_B, T_W: a full stage's times, a chunk takes half): the paper gives ZB-V a zero bubble
    rate at T_F = T_B = T_W, against (PP - 1)(T_F + T_B + T_W) per rank for 1F1B and (PP - 1)(T_F + T_B - T_W)
    for ZB-H1 (and (PP - 1)(T_F + T_B - 2 T_W) for ZB-H2: the paper's Table 2). The paper's "zero" also
    assumes its optimizer post-validation (section 4: no synchronisation between steps, so successive steps
    tile as parallelograms and the fill is not idle); here a step ends with a synchronised optimizer step
    (the grad-norm and finiteness all-reduces), so the fill stays idle (rank PP - 1 starts after PP - 1
    chunk forwards): the simulator gives exactly m (T_F + T_B + T_W) + (PP - 1) T_F / 2 for m >= 2 PP - 1, overlapped
    or blocking, i.e. (PP - 1) T_F / 2 idle per rank, a sixth of 1F1B's (tests/unit/test_schedules.py).
    Unequal times cost more (W runs right after its B in the steady state). Peak: 2 PP chunk micro-batches
    in flight on every rank, each half a stage of 1F1B's layers: 1F1B's activation memory (PP micro-batches
    of a full stage).
    Exchanges are placed by _place_exchanges (one batched exchange per unit time step), so the blocking
    form is deadlock-free too; --overlap-p2p-comm splits them as for every schedule.
    """
    check_zbv(pp_size, num_chunks)
    orders = [_zbv_order(pp_size, rank, num_microbatches, forward_only) for rank in range(pp_size)]
    actions = _place_exchanges(orders, pp_size, pp_rank)
    if forward_only:
        return actions
    return mark_sync_grads(actions) + [FinalizeGrads()]


def check_zbv(pp_size: int, num_chunks: int) -> None:
    if pp_size < 2:
        raise ConfigError("--pipeline-schedule zbv: needs --pipeline-model-parallel-size >= 2. Use auto at PP = 1.")
    if num_chunks != 2:
        raise ConfigError(f"--pipeline-schedule zbv: needs exactly two model chunks per rank (the V), got {num_chunks}. "
                          "Set --num-virtual-stages-per-pipeline-rank 2 (or --num-layers-per-virtual-pipeline-stage "
                          "to --num-layers / (2 x PP)).")


def _zbv_order(pp: int, rank: int, m: int, forward_only: bool) -> list[tuple[str, int, int]]:
    """(kind 'F'|'B'|'W', chunk, micro-batch) of one rank's computations in ZB-V order."""
    n = max(2 * pp - 1, m)  # the pattern is written for m >= 2 PP - 1; extra micro-batches are dropped below
    order: list[tuple[str, int, int]] = []
    count = {("F", 0): 0, ("F", 1): 0, ("B", 0): 0, ("B", 1): 0, ("W", 0): 0, ("W", 1): 0}

    def add(kind: str, chunk: int) -> None:
        order.append((kind, chunk, count[(kind, chunk)]))
        count[(kind, chunk)] += 1

    for _ in range(2 * (pp - rank) - 1):
        add("F", 0)
    for _ in range(rank):
        add("F", 1), add("F", 0)
    for _ in range(pp - rank):
        add("F", 1), add("B", 1), add("W", 1)
    while count[("F", 1)] < count[("F", 0)] or count[("F", 0)] < n:
        if count[("F", 0)] < n:
            add("F", 0)
        add("B", 0), add("W", 0), add("F", 1), add("B", 1), add("W", 1)
    for _ in range(rank):
        add("B", 0), add("B", 1)
    for _ in range(pp - rank):
        add("B", 0), add("W", 0)
    while count[("W", 1)] < count[("B", 1)]:
        add("W", 1)
    while count[("W", 0)] < count[("B", 0)]:
        add("W", 0)
    return [step for step in order if step[2] < m and (step[0] == "F" or not forward_only)]


def _unit_time_starts(orders: list[list[tuple[str, int, int]]], pp: int) -> list[list[int]]:
    """Start step of every computation when each takes one step and waits for its producer (the previous
    stage's F, the next stage's B, the loss's F): the lockstep timeline the exchanges are placed on."""
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, micro-batch) -> end step
    starts: list[list[int]] = [[] for _ in range(pp)]
    position, clock = [0] * pp, [0] * pp
    while any(position[r] < len(orders[r]) for r in range(pp)):
        progress = False
        for rank in range(pp):
            if position[rank] == len(orders[rank]):
                continue
            kind, chunk, mb = orders[rank][position[rank]]
            stage = virtual_stage(pp, rank, chunk, True)
            need = (("F", stage - 1, mb) if kind == "F" and stage > 0 else
                    ("B", stage + 1, mb) if kind == "B" and stage < 2 * pp - 1 else
                    ("F", stage, mb) if kind == "B" else ("B", stage, mb) if kind == "W" else None)
            if need is not None and need not in done:
                continue
            start = max(clock[rank], done[need] if need is not None else 0)
            starts[rank].append(start)
            clock[rank] = done[(kind, stage, mb)] = start + 1
            position[rank] += 1
            progress = True
        if not progress:
            raise ConfigError("--pipeline-schedule zbv: the compute orders wait on each other (schedule bug).")
    return starts


def _place_exchanges(orders: list[list[tuple[str, int, int]]], pp: int, pp_rank: int) -> list[Action]:
    """This rank's actions: its computations in order, and before the one at step t one Exchange with every
    message sent at step t (results of the step before, to or from this rank). Each exchange pairs only with
    the neighbours' exchanges of the same step, so by induction over steps no rank waits forever."""
    starts = _unit_time_starts(orders, pp)
    b = _Builder(pp, pp_rank, 2, v_shape=True)
    messages: dict[int, list[P2POp]] = {}  # step -> this rank's ops sent or received at its start
    for rank in range(pp):
        for (kind, chunk, mb), start in zip(orders[rank], starts[rank]):
            if kind == "W":
                continue
            send = P2POp(SEND_FORWARD if kind == "F" else SEND_BACKWARD, chunk, mb, True)
            if not _Builder(pp, rank, 2, v_shape=True).has_peer(send):
                continue
            if rank == pp_rank:
                messages.setdefault(start + 1, []).append(send)
            src, dst = op_stages(send, pp, rank)
            if stage_rank(pp, dst, True) == pp_rank:
                dst_chunk = 0 if dst < pp else 1
                messages.setdefault(start + 1, []).append(
                    P2POp(RECV_FORWARD if kind == "F" else RECV_BACKWARD, dst_chunk, mb, True))
    steps, next_step = sorted(messages), 0  # one pass over the steps in order (the planner builds large m)
    for (kind, chunk, mb), start in zip(orders[pp_rank], starts[pp_rank]):
        while next_step < len(steps) and steps[next_step] <= start:
            b.exchange(*messages.pop(steps[next_step]))
            next_step += 1
        if kind == "F":
            b.forward(chunk, mb)
        elif kind == "B":
            b.actions.append(Backward(chunk, mb, defer_wgrad=True))
        else:
            b.actions.append(WeightGrad(chunk, mb))
    for step in sorted(messages):
        b.exchange(*messages.pop(step))
    return b.actions


SCHEDULES: dict[str, Callable[..., list[Action]]] = {
    "no_pipelining": no_pipelining_schedule,
    "gpipe": gpipe_schedule,
    "1f1b": one_f_one_b_schedule,
    "interleaved": interleaved_1f1b_schedule,
    "zb-h1": zb_h1_schedule,
    "zbv": zbv_schedule,
}


def microbatch_groups(num_microbatches: int, group_size: int) -> list[tuple[int, int]]:
    """[first, last) of each group of micro-batches that goes through the chunks together: groups of
    `group_size`, the remainder of m / group_size joining the last group, so every group has at least
    group_size >= PP micro-batches (a smaller group would need a micro-batch's next chunk before the last
    rank has sent the previous chunk's output)."""
    starts = list(range(0, num_microbatches - group_size + 1, group_size)) or [0]
    return [(first, starts[i + 1] if i + 1 < len(starts) else num_microbatches) for i, first in enumerate(starts)]


def schedule_table(num_microbatches: int, num_chunks: int, group_size: int) -> list[tuple[int, int]]:
    """(micro-batch, chunk) of each forward in order (Megatron's get_schedule_table): each group of
    microbatch_groups goes through chunk 0, then chunk 1, ... _Interleaved reads its order from here."""
    return [(mb, chunk) for first, last in microbatch_groups(num_microbatches, group_size)
            for chunk in range(num_chunks) for mb in range(first, last)]


def check_interleaving(pp_size: int, num_chunks: int, num_microbatches: int, group_size: Optional[int] = None) -> int:
    """Megatron's conditions for interleaving (raised before any communication); returns the group size
    (--microbatch-group-size-per-virtual-pipeline-stage, default PP)."""
    if pp_size < 2:
        raise ConfigError("--num-layers-per-virtual-pipeline-stage: interleaving needs --pipeline-model-parallel-size > 1. "
                          "Drop it, or use PP >= 2.")
    group_size = pp_size if group_size is None else group_size
    if group_size < pp_size:
        raise ConfigError(f"--microbatch-group-size-per-virtual-pipeline-stage: {group_size} is smaller than "
                          f"--pipeline-model-parallel-size {pp_size}; a micro-batch would reach its next chunk before "
                          f"the previous chunk's output. Use a group size >= {pp_size}.")
    if num_microbatches < group_size:
        raise ConfigError(f"--global-batch-size: interleaved 1F1B needs at least "
                          f"--microbatch-group-size-per-virtual-pipeline-stage {group_size} micro-batches (default: "
                          f"--pipeline-model-parallel-size), got {num_microbatches}. Use {group_size} or more "
                          "micro-batches (global batch / (micro-batch x DP)), or a smaller group size.")
    return group_size


def schedule_name(pp_size: int, num_chunks: int, requested: str = "auto") -> str:
    """The schedule a configuration runs: 'auto' is no pipelining at PP = 1, interleaved with virtual
    stages, 1F1B otherwise (pipeline/auto.py may pick better by the simulator); 'gpipe', '1f1b',
    'interleaved', 'zb-h1' and 'zbv' ask for one explicitly."""
    if requested not in ("auto", *SCHEDULES):
        raise ConfigError(f"--pipeline-schedule: unknown schedule {requested!r}. Use one of auto, gpipe, 1f1b, "
                          "interleaved, zb-h1, zbv.")
    if requested == "zbv":
        check_zbv(pp_size, num_chunks)
        return "zbv"
    if num_chunks > 1:
        if requested in ("gpipe", "1f1b", "no_pipelining", "zb-h1"):
            raise ConfigError(f"--pipeline-schedule {requested}: does not support virtual stages. "
                              "Use interleaved (or auto, or zbv with two chunks per rank), or drop "
                              "--num-layers-per-virtual-pipeline-stage.")
        return "interleaved"
    if requested == "interleaved":
        raise ConfigError("--pipeline-schedule interleaved: needs virtual stages. Add --num-layers-per-virtual-pipeline-stage.")
    if pp_size == 1:
        if requested == "zb-h1":
            raise ConfigError("--pipeline-schedule zb-h1: needs --pipeline-model-parallel-size > 1. Use auto.")
        return "no_pipelining"
    return "1f1b" if requested == "auto" else requested


def build_schedule(name: str, pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                   forward_only: bool = False, group_size: Optional[int] = None, overlap: bool = False) -> list[Action]:
    """Rank pp_rank's action list; group_size is interleaving's micro-batch group (default PP); overlap
    (--overlap-p2p-comm) posts sends and receives asynchronously (overlap_p2p).

    Built once per argument set (a training run asks for the same list every step, and ZB-V's placement
    of exchanges replays the whole pipeline: ~6 ms of a PP 4, m 16 step in bench_pipeline_bubble.py);
    each call gets its own copy of the list of frozen actions."""
    return list(_build_schedule(name, pp_size, pp_rank, num_chunks, num_microbatches, forward_only, group_size,
                                overlap))


@functools.lru_cache(maxsize=256)
def _build_schedule(name: str, pp_size: int, pp_rank: int, num_chunks: int, num_microbatches: int,
                    forward_only: bool, group_size: Optional[int], overlap: bool) -> tuple[Action, ...]:
    if num_microbatches < 1:
        raise ConfigError(f"--global-batch-size: need at least one micro-batch, got {num_microbatches}.")
    if name == "interleaved":
        actions = interleaved_1f1b_schedule(pp_size, pp_rank, num_chunks, num_microbatches, forward_only, group_size)
    else:
        actions = SCHEDULES[name](pp_size, pp_rank, num_chunks, num_microbatches, forward_only)
    return tuple(overlap_p2p(actions) if overlap else actions)


def all_rank_schedules(name: str, pp_size: int, num_chunks: int, num_microbatches: int, forward_only: bool = False,
                       group_size: Optional[int] = None, overlap: bool = False) -> list[list[Action]]:
    """Every pipeline rank's action list (for the simulator and single-process tests)."""
    return [build_schedule(name, pp_size, rank, num_chunks, num_microbatches, forward_only, group_size, overlap)
            for rank in range(pp_size)]
