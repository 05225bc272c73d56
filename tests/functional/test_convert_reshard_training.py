"""Offline resharding of a real training checkpoint (model + distributed-optimizer state + LR schedule):

run A: pretrain_gpt.py, 2 ranks TP 1 x DP 2 with --use-distributed-optimizer, 4 iterations, saving at 2;
convert.py reshards iteration 2 to TP 2 (optimizer state included);
run B: 2 ranks TP 2 x DP 1 resume from the resharded checkpoint for iterations 3-4.
B's losses equal A's (fp32, rtol 1e-5: only TP's summation order differs); inspect.py reports the
resharded checkpoint. Marked slow (run with -m slow).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MODEL = ["--mock-data", "--vocab-size", "64", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
         "--eval-iters", "0", "--log-interval", "1", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--num-workers", "0", "--lr", "1e-3", "--seed", "7"]


def _run(args: list[str], cwd: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    # Own session: on a timeout the whole process group (torchrun and its ranks) is killed, no orphans.
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out: {' '.join(args)}\n{stdout[-2000:]}{stderr[-2000:]}") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def _losses(path: str) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, open(path)) if "lm_loss" in r}


@pytest.mark.slow  # three torchrun launches (~30-90 s on 2 shared cores); the fast check is in test_convert_hf
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_resharded_training_checkpoint_resumes_with_same_losses(tmp_path):
    a_save, b_save, resharded = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "resharded")
    torchrun = [TORCHRUN, "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "pretrain_gpt.py")]
    _run(torchrun + MODEL + ["--use-distributed-optimizer", "--save", a_save, "--save-interval", "2",
                             "--metrics-jsonl", str(tmp_path / "a.jsonl")], str(tmp_path))
    convert = [sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type", "GPT",
               "--loader", "megatron_lite", "--saver", "megatron_lite", "--load-dir", os.path.join(a_save, "iter_0000002"),
               "--save-dir", resharded, "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "1"]
    _run(convert, str(tmp_path))
    inspect = [sys.executable, os.path.join(ROOT, "tools", "checkpoint", "inspect.py"), "--load-dir", resharded]
    report = _run(inspect, str(tmp_path))
    assert "iteration:       2" in report and "TP=2 PP=1" in report and "optimizer state: present" in report
    assert "decoder.layers.3.mlp.linear_fc1.weight" in report
    _run(torchrun + MODEL + ["--tensor-model-parallel-size", "2", "--load", resharded, "--save", b_save,
                             "--metrics-jsonl", str(tmp_path / "b.jsonl")], str(tmp_path))
    a, b = _losses(str(tmp_path / "a.jsonl")), _losses(str(tmp_path / "b.jsonl"))
    assert sorted(b) == [3, 4]
    for iteration in (3, 4):
        assert b[iteration] == pytest.approx(a[iteration], rel=1e-5), (iteration, a, b)
