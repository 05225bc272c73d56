"""Fault injection: a rank lost mid-run, with and without torchrun's automatic restart.

Injection: MEGATRON_LITE_TEST_KILL="RANK:ITERATION" (megatron_lite/fault_injection.py) makes that rank
SIGKILL itself as it starts ITERATION, on torchrun's first attempt only.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cli import REPO, TINY, env, read_jsonl, run, train_losses

ITERS = ["--train-iters", "6", "--eval-iters", "0"]


def _torchrun(nproc: int, args: list[str], extra_env: dict, metrics, timeout: float, max_restarts: int,
             monitor_interval: float = 0.1):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--monitor-interval", str(monitor_interval),
           str(REPO / "pretrain_gpt.py"), *args, "--metrics-jsonl", str(metrics)]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        time.sleep(1.0)  # torchrun has returned: anything of its session still alive now was left behind
        leftover = _session_pids(proc.pid)
    finally:
        _kill_session(proc.pid)
    return proc.returncode, output + (f"\nLEFTOVER PROCESSES: {leftover}" if leftover else ""), time.time() - start


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.slow  # ~2 min on 2 busy cores: two 2-rank runs and a restart
def test_restart_resumes_from_latest_checkpoint_with_identical_losses(tmp_path):
    """Injects: rank 1 SIGKILLed at iteration 5 of 6 (checkpoints every 2), torchrun --max-restarts 1,
    --save D --load D. Asserts: the job exits 0, the restarted attempt resumed from iteration 4 (not from
    scratch), and every iteration's loss equals an uninterrupted 2-rank run's bitwise (fp32)."""
    ckpt = tmp_path / "ckpt"
    args = [*TINY, *ITERS, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"]
    reference, _ = run(2, [*TINY, *ITERS], tmp_path, "reference")
    rc, output, _ = _torchrun(2, args, {"MEGATRON_LITE_TEST_KILL": "1:5"}, tmp_path / "restarted.jsonl",
                              timeout=400, max_restarts=1)
    assert rc == 0 and "LEFTOVER PROCESSES" not in output, output[-6000:]
    assert "rank 1 SIGKILLs itself at iteration 5" in output
    records = read_jsonl(tmp_path / "restarted.jsonl")
    iterations = [r["iteration"] for r in records if "split" not in r and "record" not in r]
    assert iterations == [1, 2, 3, 4, 5, 6], iterations  # attempt 0 logged 1-4; attempt 1 resumed at 5
    assert train_losses(records) == train_losses(reference)
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                        "latest_checkpointed_iteration.txt", "tokenizer"]


def test_lost_rank_without_restarts_ends_the_job_in_seconds(tmp_path):
    """Injects: rank 1 SIGKILLed at iteration 3, no restarts. Asserts: the job exits non-zero well within
    the 10-minute collective timeout, the survivor's error names the collective it was waiting in (op,
    group, ranks, its own rank), and no process of the job is left behind."""
    # torchrun polls its workers every 0.1 s by default and may SIGTERM the survivor before it reaches the
    # collective; polling every 5 s lets the survivor report first, which is what this test reads.
    rc, output, seconds = _torchrun(2, [*TINY, *ITERS], {"MEGATRON_LITE_TEST_KILL": "1:3"},
                                    tmp_path / "lost.jsonl", timeout=240, max_restarts=0, monitor_interval=5)
    assert rc != 0 and seconds < 120, (rc, seconds, output[-4000:])
    assert "LEFTOVER PROCESSES" not in output, output[-2000:]
    assert "CollectivePeerLostError" in output, output[-6000:]
    assert ("on group 'dp' (ranks [0, 1]) failed on rank 0 while waiting for a peer: 'Connection reset by peer'"
            in output or "'Connection closed by peer'" in output), output[-6000:]
