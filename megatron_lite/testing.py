"""Run a function on N real processes with the gloo backend: the harness of every distributed test.

`run_distributed(fn, world_size, **kwargs)` starts `world_size` processes, calls `fn(**kwargs)` on each
after torch.distributed is initialised, and returns the list of results in rank order. Results must be
picklable (tensors are fine). No process outlives the call. Failures raise `DistributedTestError`:
- a rank raises: every failing rank's traceback (the first one marked), and after a short grace period
  the ranks still running, each with what it was doing (the collective it is blocked in, from
  `collectives.in_flight()`, polled by a heartbeat thread into shared memory);
- a rank exits without reporting (exit code 0 included, e.g. `os._exit(0)`): caught at once, not at the
  deadline;
- a hang: each rank's collective timeout is 3/4 of `timeout`, so a rank stuck in a collective raises
  `CollectiveTimeoutError` (naming op, group and rank) before the parent's deadline; at the deadline the
  parent names the ranks that never finished and the collective each one is in.
The rendezvous store is a TCPStore the parent opens on port 0 and keeps for the whole run, so the port
is the kernel's choice, held from start to end (no bind/close/re-bind race between parallel runs).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

_CTX = None
RANK_TIMEOUT_FRACTION = 0.75  # a rank's collective timeout, as a fraction of run_distributed's timeout
GRACE_AFTER_ERROR_S = 3.0  # how long the other ranks get to report after the first error
_STATE_BYTES = 512


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung."""


def _context():
    # forkserver: children fork from a server that has imported torch once, so a spawn costs ~0.1 s
    # instead of a fresh interpreter + torch import per rank, without fork's unsafety in the parent.
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "megatron_lite.parallel_state",
                                     "megatron_lite.collectives"])
    return _CTX


def _write_state(state, text: str) -> None:
    data = text.encode("utf-8", "replace")[:_STATE_BYTES - 1]
    state.value = data


def _heartbeat(state, phase: list, stop: threading.Event) -> None:
    """Every 0.1 s: this rank's phase and, while it is inside one, the collective it is blocked in."""
    from megatron_lite import collectives
    while not stop.wait(0.1):
        current = collectives.in_flight()
        _write_state(state, phase[0] + (f"; blocked in {current}" if current else ""))


def _worker(fn: Callable, rank: int, world_size: int, port: int, results, state, kwargs: dict, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from megatron_lite import collectives, parallel_state
    torch.set_num_threads(1)
    phase, stop = ["initialising torch.distributed"], threading.Event()
    threading.Thread(target=_heartbeat, args=(state, phase, stop), daemon=True).start()
    rank_timeout = timedelta(seconds=timeout * RANK_TIMEOUT_FRACTION)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=rank_timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=rank_timeout)
        collectives.set_timeout(rank_timeout.total_seconds() / 60)
        collectives.reset_comm_stats()
        phase[0] = f"running {getattr(fn, '__name__', fn)}"
        result = fn(**kwargs)
        phase[0] = "returned; sending the result"
        results.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        phase[0] = "raised"
        results.put((rank, "error", traceback.format_exc()))
    finally:
        phase[0] += "; shutting down"
        try:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        stop.set()


def run_distributed(fn: Callable[..., Any], world_size: int, timeout: float = 240.0, **kwargs) -> list:
    """Call fn(**kwargs) on `world_size` gloo ranks; return each rank's result (rank order)."""
    import torch.distributed as dist
    ctx = _context()
    results = ctx.Queue()
    # The parent owns the rendezvous store: port 0 lets the kernel pick a port that stays bound.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    states = [ctx.Array("c", _STATE_BYTES, lock=False) for _ in range(world_size)]
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, store.port, results, states[rank], kwargs, timeout),
                         daemon=True) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outcome: dict[int, tuple[str, Any]] = {}
    first_error: list[int] = []
    deadline = time.monotonic() + timeout
    error_deadline = None

    def receive(wait: float) -> bool:
        try:
            rank, status, payload = results.get(timeout=wait) if wait > 0 else results.get_nowait()
        except queue_module.Empty:
            return False
        outcome[rank] = (status, payload)
        if status == "error" and not first_error:
            first_error.append(rank)
        return True

    try:
        while len(outcome) < world_size:
            now = time.monotonic()
            if now > deadline:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise DistributedTestError(f"ranks {missing} did not finish within {timeout:.0f} s (hang?)."
                                           + _still_running(procs, states, outcome) + _format_errors(outcome, first_error))
            if error_deadline is not None and now > error_deadline:
                break  # the others are most likely blocked in a collective waiting for the failed rank
            if receive(0.2):
                if first_error and error_deadline is None:
                    error_deadline = time.monotonic() + GRACE_AFTER_ERROR_S
                continue
            exited = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in outcome]
            if exited:
                while receive(0.5):  # a rank's last message may still be in the pipe
                    pass
                for r in exited:
                    if r not in outcome:
                        outcome[r] = ("error", f"process exited with code {procs[r].exitcode} without reporting a result "
                                               f"(last state: {_state(states[r])})")
                        if not first_error:
                            first_error.append(r)
                if first_error and error_deadline is None:
                    error_deadline = time.monotonic() + GRACE_AFTER_ERROR_S
        running = _still_running(procs, states, outcome)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
        del store
    if any(status == "error" for status, _ in outcome.values()) or len(outcome) < world_size:
        raise DistributedTestError((_format_errors(outcome, first_error) or "a rank failed without a traceback") + running)
    return [pickle.loads(outcome[rank][1]) for rank in range(world_size)]


def _state(state) -> str:
    return state.value.decode("utf-8", "replace") or "not started"


def _still_running(procs, states, outcome: dict) -> str:
    """One line per rank that has not reported, with the collective it is blocked in (if any)."""
    lines = [f"\n  rank {r}: {_state(states[r])}" for r, p in enumerate(procs) if r not in outcome and p.is_alive()]
    return ("\nranks still running (killed), with their last state:" + "".join(lines)) if lines else ""


def _format_errors(outcome: dict, first_error: list) -> str:
    return "".join(f"\n--- rank {rank}{' (first error)' if first_error and rank == first_error[0] else ''} ---\n{payload}"
                   for rank, (status, payload) in sorted(outcome.items()) if status == "error")
