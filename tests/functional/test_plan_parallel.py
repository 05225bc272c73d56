"""pretrain_gpt.py --auto-parallel as a user runs it, and tools/plan_parallel.py --check-against its metrics."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cli import REPO, TINY, env, run, train_losses


@pytest.mark.slow
def test_auto_parallel_trains_with_the_plan_and_check_against_matches(tmp_path):
    args = [*TINY, "--train-iters", "3", "--auto-parallel", "--tensor-model-parallel-size", "2",
            "--measure-activation-memory"]
    records, output = run(4, args, tmp_path, "auto")
    assert "auto-parallel: 4 x cpu" in output, output[-3000:]
    line = next(x for x in output.splitlines() if x.startswith("auto-parallel flags: "))
    flags = line[len("auto-parallel flags: "):].split()
    assert flags[:2] == ["--tensor-model-parallel-size", "2"]  # the explicit flag won
    memory = next(r for r in records if r.get("record") == "memory")
    assert memory["activations"] > 0
    assert sorted(train_losses(records)) == [1, 2, 3]
    model = [a for a in TINY if a not in ("--mock-data",)]
    model = [a for i, a in enumerate(model) if not (model[i - 1] == "--micro-batch-size" if i else False)
             and a != "--micro-batch-size"]
    check = subprocess.run([sys.executable, str(REPO / "tools" / "plan_parallel.py"), *model, *flags,
                            "--num-gpus", "4", "--gpus-per-node", "4", "--hardware", "a100-80gb", "--evaluate",
                            "--check-against", str(tmp_path / "auto.jsonl")],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("exact") == 4 and "within 10%" in check.stdout, check.stdout
