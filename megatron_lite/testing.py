"""Run a function on N real processes with the gloo backend: the harness of every distributed test.

`run_distributed(fn, world_size, **kwargs)` starts `world_size` processes on a free port, calls
`fn(**kwargs)` on each after torch.distributed is initialised, and returns the list of results in
rank order. If any rank raises, it raises `DistributedTestError` with every failing rank's traceback;
if the ranks do not finish within `timeout` seconds (a hang), it kills them and says which were
missing. No process outlives the call. Results must be picklable (tensors are fine).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

_CTX = None


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, results, kwargs: dict, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from megatron_lite import collectives, parallel_state
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        collectives.set_timeout(timeout / 60)
        collectives.reset_comm_stats()
        result = fn(**kwargs)
        results.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn: Callable[..., Any], world_size: int, timeout: float = 240.0, **kwargs) -> list:
    """Call fn(**kwargs) on `world_size` gloo ranks; return each rank's result (rank order)."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, port, results, kwargs, timeout), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    first_error_at = None
    try:
        while len(outcome) < world_size:
            now = time.monotonic()
            if now > deadline:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise DistributedTestError(f"ranks {missing} did not finish within {timeout:.0f} s (hang?)."
                                           + _format_errors(outcome))
            if first_error_at is not None and now - first_error_at > 3.0:
                break  # the others are most likely blocked in a collective waiting for the failed rank
            try:
                rank, status, payload = results.get(timeout=0.2)
                outcome[rank] = (status, payload)
                if status == "error" and first_error_at is None:
                    first_error_at = time.monotonic()
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None) and r not in outcome]
                if dead:
                    time.sleep(0.5)  # let a last message arrive
                    while True:
                        try:
                            rank, status, payload = results.get_nowait()
                            outcome[rank] = (status, payload)
                        except queue_module.Empty:
                            break
                    for r in dead:
                        outcome.setdefault(r, ("error", f"process died with exit code {procs[r].exitcode}"))
                    first_error_at = first_error_at or time.monotonic()
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
    if any(status == "error" for status, _ in outcome.values()) or len(outcome) < world_size:
        raise DistributedTestError(_format_errors(outcome) or "a rank failed without a traceback")
    return [pickle.loads(outcome[rank][1]) for rank in range(world_size)]


def _format_errors(outcome: dict) -> str:
    return "".join(f"\n--- rank {rank} ---\n{payload}" for rank, (status, payload) in sorted(outcome.items())
                   if status == "error")
