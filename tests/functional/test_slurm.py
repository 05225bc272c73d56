"""scripts/train_slurm.sbatch on a real Slurm cluster, submitted as a user would (sbatch with command-line
overrides only: a CPU node, 1 node x 2 processes, the tiny model on mock data).

Needs a running cluster: `sudo bash scripts/slurm/start_cluster.sh` (.ci/run starts one when it can);
skipped with the reason otherwise. Takes 1-3 minutes on 2 CPUs (depending on load): an uninterrupted job
(the reference losses), then a job whose tasks get SIGTERM mid-run, as `--signal=TERM@<lead>` and
pre-emption deliver it: it saves, ends its attempt cleanly, requeues itself and resumes from its
checkpoint to the same losses; last, a job whose workers fail ends FAILED and is not requeued.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import LLAMA, REPO, TINY, read_jsonl, train_losses

pytestmark = pytest.mark.slurm

SBATCH = REPO / "scripts" / "train_slurm.sbatch"
# Enough iterations that the signal, sent after iteration 3, lands mid-run even on a quiet machine
# (~20 ms per iteration; ~250 ms when the machine is busy).
ITERS = 120


def _slurm_unavailable() -> str | None:
    missing = [tool for tool in ("sbatch", "scontrol", "scancel", "sinfo") if shutil.which(tool) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not found): sudo bash scripts/slurm/start_cluster.sh"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "Slurm does not answer (scontrol ping timed out)"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "no Slurm controller is running: sudo bash scripts/slurm/start_cluster.sh"
    if not re.search(r"^(idle|mix|alloc|comp|plan)", nodes.stdout, re.M):
        return f"no Slurm node is up (sinfo states: {nodes.stdout.split()})"
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    ours = conf.is_file() and "written by megatron_lite scripts/slurm/start_cluster.sh" in conf.read_text()
    if not ours and os.environ.get("MEGATRON_LITE_SLURM_TEST") != "1":
        return (f"the running Slurm cluster ({conf}) was not started by scripts/slurm/start_cluster.sh; "
                "MEGATRON_LITE_SLURM_TEST=1 submits to it anyway (its nodes must see this test's temp dir)")
    return None


def _export() -> str:
    """--export=NONE when the script's default interpreter (<repo>/.venv/bin/python) is this one: the job
    then sees no variable of ours. Otherwise only PYTHON is passed, still no PATH or virtualenv."""
    if Path(sys.executable) == REPO / ".venv" / "bin" / "python":
        return "--export=NONE"
    return f"--export=PYTHON={sys.executable}"


def _submit(tmp: Path, name: str, flags: list[str]) -> tuple[str, Path, Path]:
    log, metrics = tmp / f"{name}.out", tmp / f"{name}.jsonl"
    command = ["sbatch", "--parsable", _export(), "--job-name", f"ml-{name}", "--output", str(log),
               "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",  # a CPU node: 2 workers
               str(SBATCH), str(REPO / "configs" / "tiny_cpu.yaml"), *TINY, *LLAMA,
               "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
               "--train-iters", str(ITERS), "--metrics-jsonl", str(metrics), *flags]
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=60)  # submitted from elsewhere
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0], log, metrics


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_done(job_id: str, log: Path, timeout: float = 240) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} not done in {timeout} s: {_job(job_id)}\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text()[-5000:] if log.exists() else f"(no log at {log})"


def test_sbatch_completes_then_sigterm_saves_requeues_and_resumes_to_the_same_losses(tmp_path):
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    jobs: list[str] = []
    try:
        # 1. Uninterrupted: the job completes, exit 0; its losses are the reference.
        job_id, log, metrics = _submit(tmp_path, "straight", [])
        jobs.append(job_id)
        job = _wait_done(job_id, log)
        text = log.read_text()
        assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), _tail(log)
        assert f"job {job_id} attempt 1: 1 node(s) x 2 process(es)" in text, text[:2000]
        assert f"rendezvous {job['BatchHost']}:{20000 + int(job_id) % 20000}" in text  # port from the job id
        assert "attempt 1: training finished" in text
        expected = train_losses(read_jsonl(metrics))
        assert sorted(expected) == list(range(1, ITERS + 1)), _tail(log)

        # 2. SIGTERM to the job's tasks mid-run (torchrun and its workers, not the batch shell): what
        #    --signal=TERM@<lead>, pre-emption and GraceTime deliver.
        save = tmp_path / "ckpt"
        job_id, log, metrics = _submit(tmp_path, "preempted", ["--save", str(save), "--load", str(save)])
        jobs.append(job_id)
        deadline = time.time() + 120
        while not any(r.get("iteration", 0) >= 3 for r in read_jsonl(metrics)):
            assert time.time() < deadline and _job(job_id).get("JobState") in ("PENDING", "RUNNING"), _tail(log)
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=30)
        job = _wait_done(job_id, log)
        text = log.read_text()
        # The attempt that was stopped saved, exited cleanly and requeued; the second resumed and completed.
        assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), _tail(log)
        stopped = re.search(r"saved checkpoint at iteration (\d+) to \S+ \(SIGTERM\)", text)
        assert stopped, _tail(log)
        saved = int(stopped.group(1))
        assert 3 <= saved < ITERS and (save / f"iter_{saved:07d}").is_dir()
        assert re.search(r"SIGTERM \(\S+ left\): the workers save and exit, torchrun waits for them", text), _tail(log)
        assert f"attempt 1: saved and stopped on SIGTERM; requeueing job {job_id}" in text
        assert f"job {job_id} attempt 2:" in text
        assert f"loaded checkpoint from {save} at iteration {saved}" in text
        assert "attempt 2: training finished" in text
        assert "forcefully exiting" not in text and "SignalException" not in text  # torchrun left SIGTERM alone
        records = [r["iteration"] for r in read_jsonl(metrics) if "split" not in r and "record" not in r]
        assert records == list(range(1, ITERS + 1)), records  # each iteration once across both attempts
        assert train_losses(read_jsonl(metrics)) == expected  # bitwise: same layout, data order, RNG

        # 3. A worker that fails (here a configuration error) fails the job: FAILED, no requeue.
        job_id, log, _ = _submit(tmp_path, "bad", ["--tensor-model-parallel-size", "3"])
        jobs.append(job_id)
        job = _wait_done(job_id, log)
        text = log.read_text()
        assert (job["JobState"], job["Restarts"]) == ("FAILED", "0") and job["ExitCode"] != "0:0", _tail(log)
        assert "--tensor-model-parallel-size" in text and "attempt 1: training failed" in text, _tail(log)
    finally:
        for job_id in jobs:
            if _job(job_id).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED"):
                subprocess.run(["scancel", job_id], timeout=30)
