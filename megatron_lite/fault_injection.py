"""Test-only fault injection for tests/faults/, driven by environment variables nobody sets in production.

MEGATRON_LITE_TEST_KILL="RANK:ITERATION"  global rank RANK SIGKILLs itself when it is about to run
                                          ITERATION, on torchrun's first attempt only (so a restarted
                                          attempt runs through): a node lost mid-run.
MEGATRON_LITE_TEST_NAN="ITERATION[:RANK]" at ITERATION (every attempt) rank RANK (default 0) turns its
                                          loss into NaN before backward, so both the loss and the grads
                                          of that step are non-finite: a numerical blow-up on one rank.
Each reads its variable once per call and costs nothing when it is unset.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

import torch

KILL_ENV = "MEGATRON_LITE_TEST_KILL"
NAN_ENV = "MEGATRON_LITE_TEST_NAN"


def _parse(env: str) -> Optional[tuple[int, ...]]:
    value = os.environ.get(env)
    if not value:
        return None
    try:
        return tuple(int(part) for part in value.split(":"))
    except ValueError:
        raise ValueError(f"{env}={value!r}: expected integers separated by ':' (see fault_injection.py)") from None


def maybe_kill(iteration: int, rank: int) -> None:
    """SIGKILL this process if MEGATRON_LITE_TEST_KILL names (rank, iteration) and this is attempt 0."""
    target = _parse(KILL_ENV)
    if target is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if target == (rank, iteration):
        print(f"fault injection: rank {rank} SIGKILLs itself at iteration {iteration}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_loss(loss: torch.Tensor, iteration: int, rank: int) -> torch.Tensor:
    """loss * NaN if MEGATRON_LITE_TEST_NAN names this iteration (and rank, default 0)."""
    target = _parse(NAN_ENV)
    if target is None:
        return loss
    nan_iteration, nan_rank = (target + (0,))[:2]
    if (iteration, rank) != (nan_iteration, nan_rank):
        return loss
    return loss * float("nan")
