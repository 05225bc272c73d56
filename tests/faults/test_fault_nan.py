"""Fault injection: non-finite losses (--check-for-nan-in-loss-and-grad, on by default).

Injection: MEGATRON_LITE_TEST_NAN="ITERATION[:RANK]" (megatron_lite/fault_injection.py) multiplies that
rank's loss by NaN at ITERATION before backward; or an initialisation so large (--init-method-std 1e30)
that the very first loss is not finite.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from cli import TINY, command, env, read_jsonl, REPO
from megatron_lite.checkpoint_io import CheckpointReader, read_tracker

ARGS = [*TINY, "--eval-iters", "0"]


def _run(nproc: int, args: list[str], tmp, name: str, extra_env: dict, timeout: float = 240):
    metrics = tmp / f"{name}.jsonl"
    proc = subprocess.run(command(nproc, [*args, "--metrics-jsonl", str(metrics)]), cwd=REPO,
                          env={**env(), **extra_env}, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, read_jsonl(metrics)


@pytest.mark.slow  # a 2-rank torchrun job (~40 s on 2 busy cores)
def test_nan_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path):
    """Injects: NaN loss on rank 1 (of 2, DP=2) at iteration 3; checkpoints every 2 iterations; --on-nan exit
    (the default). Asserts: exit code 1, one message naming iteration 3 and rank 1, no iteration 3 logged
    or saved, and the tracker still points at iteration 2, whose checkpoint reads back finite."""
    ckpt = tmp_path / "ckpt"
    rc, output, records = _run(2, [*ARGS, "--train-iters", "5", "--save", str(ckpt), "--save-interval", "2"],
                               tmp_path, "exit", {"MEGATRON_LITE_TEST_NAN": "3:1"})
    assert rc != 0, output[-4000:]
    message = "iteration 3: non-finite loss on rank 1"
    assert output.count(message) == 1, output[-4000:]
    assert "--on-nan exit" in output and "iteration 2) is the last good one" in output
    assert "non-finite loss in forward" not in output
    assert [r["iteration"] for r in records if "split" not in r and "record" not in r] == [1, 2]
    assert read_tracker(str(ckpt)) == 2 and not (ckpt / "iter_0000003").exists()
    reader = CheckpointReader(str(ckpt))
    assert all(torch.isfinite(reader.full_tensor(name)).all() for name in reader.param_names())


def test_skip_drops_the_update_and_training_continues(tmp_path):
    """Injects: NaN loss at iteration 3 of 5 with --on-nan skip, saving every iteration (one process).
    Asserts: exit 0; iteration 3 is logged as skipped and NaN; the weights and optimizer states saved after
    iteration 3 equal those after iteration 2 bitwise (no NaN update, no partial update); later losses
    are finite and iteration 4 updates the weights again."""
    ckpt = tmp_path / "ckpt"
    rc, output, records = _run(1, [*ARGS, "--train-iters", "5", "--on-nan", "skip", "--save", str(ckpt),
                                   "--save-interval", "1"], tmp_path, "skip", {"MEGATRON_LITE_TEST_NAN": "3"})
    assert rc == 0, output[-4000:]
    assert output.count("iteration 3: non-finite loss on rank 0") == 1 and "skipping it (--on-nan skip)" in output
    by_iter = {r["iteration"]: r for r in records if "split" not in r and "record" not in r}
    assert by_iter[3]["skipped_iterations"] == 1 and by_iter[3]["nan_iterations"] == 1
    assert by_iter[3]["lm_loss"] != by_iter[3]["lm_loss"]  # NaN
    assert all(by_iter[i]["lm_loss"] == by_iter[i]["lm_loss"] for i in (1, 2, 4, 5))
    states = {i: _state(ckpt / f"iter_{i:07d}") for i in (2, 3, 4)}
    assert _same(states[2], states[3]) and not _same(states[3], states[4])


def test_huge_init_fails_at_the_first_step_with_one_message(tmp_path):
    """Injects: --init-method-std 1e30 in fp32 (the issue's reproduction). Asserts: exit code 1 after one
    message naming iteration 1 and rank 0 (before: every iteration logged NaN, the NaN update was applied,
    48 'non-finite loss in forward' lines, exit 0)."""
    rc, output, records = _run(1, [*ARGS, "--train-iters", "4", "--init-method-std", "1e30"], tmp_path, "huge", {})
    assert rc == 1, output[-4000:]
    assert output.count("iteration 1: non-finite loss on rank 0") == 1
    assert "lm loss: NAN" not in output and "non-finite loss in forward" not in output and [r for r in records if "record" not in r] == []


def _state(path) -> dict:
    reader = CheckpointReader(str(path))
    model = {name: reader.full_tensor(name) for name in reader.param_names()}
    optim = torch.load(path / "optim_tp0_pp0.pt")
    return {"model": model, "optim": optim}


def _same(a: dict, b: dict) -> bool:
    same_model = all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    same_optim = all(torch.equal(a["optim"][n][k], b["optim"][n][k]) for n in a["optim"] for k in a["optim"][n])
    return same_model and same_optim
