"""Test-only fault injection for tests/faults/, driven by environment variables nobody sets in production.

MEGATRON_LITE_TEST_KILL="RANK:ITERATION"  global rank RANK SIGKILLs itself when it is about to run
                                          ITERATION, on torchrun's first attempt only (so a restarted
                                          attempt runs through): a node lost mid-run.
MEGATRON_LITE_TEST_NAN="ITERATION[:RANK]" at ITERATION (every attempt) rank RANK (default 0, a last
                                          pipeline stage) turns its loss into NaN before backward, so both
                                          the loss and the grads of that step are non-finite.
MEGATRON_LITE_TEST_DISK_FULL="RANK:ITERATION"  rank RANK's checkpoint writer fails with ENOSPC ("No space
                                          left on device") before its first file of ITERATION's save: a
                                          full disk mid-save, without filling one.
MEGATRON_LITE_TEST_SLOW_SAVE="SECONDS"    every checkpoint writer sleeps SECONDS before each file: a slow
                                          file system, so a test can signal or kill a job mid-save.
Each reads its variable once per call and costs nothing when it is unset.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from typing import Optional

KILL_ENV = "MEGATRON_LITE_TEST_KILL"
NAN_ENV = "MEGATRON_LITE_TEST_NAN"
DISK_FULL_ENV = "MEGATRON_LITE_TEST_DISK_FULL"
SLOW_SAVE_ENV = "MEGATRON_LITE_TEST_SLOW_SAVE"


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


def poison_forward_step(forward_step_func, iteration: int, rank: int):
    """forward_step_func, or (at MEGATRON_LITE_TEST_NAN's iteration and rank) a wrapper whose loss function
    returns its loss (and the reported 'lm loss') times NaN, before backward."""
    target = _parse(NAN_ENV)
    if target is None or (iteration, rank) != (target + (0,))[:2]:
        return forward_step_func

    def poisoned(*args, **kwargs):
        output, loss_func = forward_step_func(*args, **kwargs)

        def poisoned_loss(*loss_args, **loss_kwargs):
            loss, reported = loss_func(*loss_args, **loss_kwargs)
            return loss * float("nan"), {key: value * float("nan") for key, value in reported.items()}
        return output, poisoned_loss
    return poisoned


def maybe_fail_write(iteration: int, rank: int, path: str) -> None:
    """Before a checkpoint file is written: sleep (MEGATRON_LITE_TEST_SLOW_SAVE), or raise OSError(ENOSPC)
    for `path` if MEGATRON_LITE_TEST_DISK_FULL names (rank, iteration)."""
    delay = os.environ.get(SLOW_SAVE_ENV)
    if delay:
        time.sleep(float(delay))
    if _parse(DISK_FULL_ENV) == (rank, iteration):
        raise OSError(errno.ENOSPC, "No space left on device (fault injection)", path)
