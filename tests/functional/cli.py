"""Helpers for functional tests: run pretrain_gpt.py as a user would and read its JSONL metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A small Llama-ish model on mock data: fast on CPU, exercises RoPE/GQA/SwiGLU/RMSNorm, no dropout so
# every layout must match the single-process losses.
TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--mock-data", "--vocab-size", "101", "--tokenizer-type", "NullTokenizer", "--make-vocab-size-divisible-by", "8",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "0.01", "--lr-warmup-iters", "2",
        "--lr-decay-style", "cosine", "--min-lr", "0.001", "--seed", "7", "--log-interval", "1",
        "--eval-interval", "1000", "--eval-iters", "1", "--num-workers", "0", "--split", "98,1,1"]
LLAMA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
         "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
         "--ffn-hidden-size", "64"]


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / "pretrain_gpt.py"), *args]
    # --standalone: torchrun's own store binds port 0 and the workers reuse it, so no port is chosen
    # here and released before torchrun binds it (a race when tests run in parallel).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(REPO / "pretrain_gpt.py"), *args]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(nproc: int, args: list[str], tmp: Path, name: str, timeout: float = 300) -> tuple[list[dict], str]:
    """Run training; return (JSONL records, combined output). Fails the test on a non-zero exit."""
    metrics = tmp / f"{name}.jsonl"
    if metrics.exists():
        metrics.unlink()
    proc = subprocess.run(command(nproc, [*args, "--metrics-jsonl", str(metrics)]), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{output[-6000:]}"
    return read_jsonl(metrics), output


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records if "split" not in r and "record" not in r}


def start(nproc: int, args: list[str], tmp: Path, name: str) -> tuple[subprocess.Popen, Path]:
    metrics = tmp / f"{name}.jsonl"
    proc = subprocess.Popen(command(nproc, [*args, "--metrics-jsonl", str(metrics)]), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, metrics


def wait_for_iteration(metrics: Path, iteration: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("iteration", 0) >= iteration and "split" not in r for r in read_jsonl(metrics)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"iteration {iteration} not reached in {timeout} s")
