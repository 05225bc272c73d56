"""The actions a pipeline schedule is made of (schedules.py builds lists of them, runner.py runs them,
simulator.py checks them), and where each model chunk sits in the pipeline.

Communication actions name the tensor they carry by (direction, chunk, micro-batch) of the *local* rank:
`send_forward(c, m)` sends the output of chunk c's forward of m to the next virtual stage;
`recv_forward(c, m)` receives chunk c's input for m; `send_backward`/`recv_backward` carry the
gradients the other way. Ops of one `Exchange` are started together (batched) and waited on together;
with --overlap-p2p-comm (overlap.py) they are split into `Post` and `Wait` actions instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

SEND_FORWARD, RECV_FORWARD, SEND_BACKWARD, RECV_BACKWARD = "send_forward", "recv_forward", "send_backward", "recv_backward"


@dataclass(frozen=True)
class Forward:
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class Backward:
    chunk: int
    microbatch: int
    # The last backward of a chunk on this rank runs with data-parallel grad sync enabled (outside
    # no_sync), so DDP can overlap its reduction with the remaining backward work; all others accumulate.
    sync_grads: bool = False
    # Split backward (B): the linear layers' weight gradients are queued for this (chunk, micro-batch)'s
    # WeightGrad action (W) instead of computed here (--delay-wgrad-compute semantics).
    defer_wgrad: bool = False


@dataclass(frozen=True)
class WeightGrad:
    """W: run the weight-gradient computations that Backward(chunk, microbatch, defer_wgrad=True) queued;
    off the critical path, so a schedule can place it in a bubble. The chunk's last W syncs grads."""
    chunk: int
    microbatch: int
    sync_grads: bool = False


@dataclass(frozen=True)
class P2POp:
    kind: str  # SEND_FORWARD, RECV_FORWARD, SEND_BACKWARD or RECV_BACKWARD
    chunk: int
    microbatch: int
    v_shape: bool = False  # ZB-V's chunk placement (virtual_stage): the op's peer follows the V


def virtual_stage(pp_size: int, pp_rank: int, chunk: int, v_shape: bool = False) -> int:
    """The virtual stage model chunk `chunk` of rank `pp_rank` holds: chunk x PP + rank (looped, as
    interleaved 1F1B), or with ZB-V's V (v_shape) chunk 0 is stage r and chunk 1 is stage 2 PP - 1 - r, so
    rank 0 holds the first and the last stage and rank PP - 1 the two middle ones."""
    if v_shape:
        return pp_rank if chunk == 0 else 2 * pp_size - 1 - pp_rank
    return chunk * pp_size + pp_rank


def stage_rank(pp_size: int, stage: int, v_shape: bool = False) -> int:
    """The pipeline rank holding virtual stage `stage` (the inverse of virtual_stage)."""
    if v_shape:
        return stage if stage < pp_size else 2 * pp_size - 1 - stage
    return stage % pp_size


def op_stages(op: P2POp, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """(sending virtual stage, receiving virtual stage) of the tensor a p2p op carries."""
    stage = virtual_stage(pp_size, pp_rank, op.chunk, op.v_shape)
    if op.kind == SEND_FORWARD:
        return stage, stage + 1
    if op.kind == RECV_FORWARD:
        return stage - 1, stage
    if op.kind == SEND_BACKWARD:
        return stage, stage - 1
    if op.kind == RECV_BACKWARD:
        return stage + 1, stage
    raise ValueError(f"unknown p2p op {op.kind!r}")


def op_peer(op: P2POp, pp_size: int, pp_rank: int) -> int:
    """The pipeline rank at the other end of a p2p op (this rank itself at ZB-V's turn)."""
    src, dst = op_stages(op, pp_size, pp_rank)
    return stage_rank(pp_size, dst if op.kind in (SEND_FORWARD, SEND_BACKWARD) else src, op.v_shape)


@dataclass(frozen=True)
class Exchange:
    ops: tuple[P2POp, ...]


@dataclass(frozen=True)
class Post:
    """Start these ops asynchronously (--overlap-p2p-comm); each is completed by a later Wait."""
    ops: tuple[P2POp, ...]


@dataclass(frozen=True)
class Wait:
    """Wait for posted ops: a receive just before the compute that needs it, a send once the next send in
    the same direction has been posted (its output is then freed) or at the end."""
    ops: tuple[P2POp, ...]


@dataclass(frozen=True)
class FinalizeGrads:
    """All backward passes are done: finish gradient reduction (DP, sequence-parallel, tied embeddings)."""


Action = Union[Forward, Backward, WeightGrad, Exchange, Post, Wait, FinalizeGrads]
