"""The benchmark scripts still run (tiny shapes, one step): they are not part of the timed suite, but a
script that no longer starts is a defect found too late. Figures are not checked here."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cli import REPO, env


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_cross_entropy_runs() -> None:
    out = _run("bench_cross_entropy.py", "--tokens", "64", "--hidden", "16", "--vocab", "128", "--steps", "1")
    assert "| fp32 | fused_linear (default) |" in out and "| bf16 | unfused, vocab-parallel CE |" in out


def test_bench_vs_reference_runs() -> None:
    out = _run("bench_vs_reference.py", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "16", "--batch", "2",
               "--vocab", "128", "--warmup", "1", "--steps", "1", "--dtype", "fp32")
    assert "| fp32 |" in out and "cross_entropy=fused_linear" in out


def test_bench_zero_runs() -> None:
    out = _run("bench_zero.py", "--world", "2", "--layers", "1", "--hidden", "64", "--steps", "1")
    assert "| ZeRO-2 (optim_grads) |" in out and "| ZeRO-2 + NVMe offload 1.0 |" in out and "Largest model" in out
    assert "| ZeRO-3 (optim_grads_params) |" in out and "gathered units per rank" in out


@pytest.mark.slow  # ~30 s: two 2-rank runs
def test_bench_checkpoint_runs() -> None:
    out = _run("bench_checkpoint.py", "--dp", "2", "--layers", "1", "--hidden", "64", "--steps", "1")
    assert "| DP | checkpoint MiB | sharded save s |" in out and "\n| 2 |" in out


@pytest.mark.slow  # ~10-40 s: seven 2-rank runs
def test_bench_init_runs() -> None:
    out = _run("bench_init.py", "--world", "2", "--step-world", "2", "--layers", "1", "--small-layers", "1", "--hidden", "256",
               "--ffn", "512", "--vocab", "1000", "--before-rev", "HEAD")  # (HEAD: in any checkout, shallow ones too)
    assert "| before | ZeRO-3 DP 2 | 1 |" in out and "| after | ZeRO-3 DP 2 | 1 |" in out and "| after | TP 2 | 1 |" in out


def test_bench_moe_runs() -> None:
    out = _run("bench_moe.py", "--hidden", "32", "--ffn", "16", "--tokens", "64", "--tokens-bytes", "8", "--repeats", "1",
               "--skip-training")
    assert "| MoE, grouped GEMM |" in out and "All-to-all bytes" in out
