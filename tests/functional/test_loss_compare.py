"""scripts/loss_compare.py as a user runs it: two layouts of the same model, data and seed print the same
per-iteration losses (fp32: within 1e-5 relative) and exit 0; runs that differ beyond --tolerance exit 1."""
from __future__ import annotations

import json
import subprocess
import sys

from cli import REPO, TINY, env

SCRIPT = str(REPO / "scripts" / "loss_compare.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)


def _table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]


def test_two_layouts_agree_and_a_different_run_fails(tmp_path):
    same = _run("--layout-a", "", "--layout-b", "--tensor-model-parallel-size 2", "--tolerance", "1e-5",
                "--workdir", str(tmp_path), "--", *TINY, "--train-iters", "3")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "dropout is on" not in same.stderr  # TINY turns dropout off
    table = _table(same.stdout)
    assert [int(row[0]) for row in table] == [1, 2, 3]
    assert all(abs(float(a) - float(b)) <= 1e-5 * float(a) for _, a, b, _ in table)
    assert "[a] 1 process(es): (common flags only)" in same.stdout
    assert "[b] 2 process(es): --tensor-model-parallel-size 2" in same.stdout
    last = same.stdout.splitlines()[-1]
    assert last.startswith("largest relative difference") and last.endswith("OK")

    # The same comparison from the saved metrics, with run B's iteration-2 loss moved by 1e-4 relative.
    records = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    for record in records:
        if record.get("iteration") == 2 and "split" not in record:
            record["lm_loss"] *= 1 + 1e-4
    (tmp_path / "b_moved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    moved = _run("--from-jsonl", str(tmp_path / "a.jsonl"), str(tmp_path / "b_moved.jsonl"), "--tolerance", "1e-5")
    assert moved.returncode == 1, moved.stdout + moved.stderr
    assert moved.stdout.splitlines()[-1].endswith("at iteration 2 (tolerance 1e-05): FAIL")
    assert _run("--from-jsonl", str(tmp_path / "a.jsonl"), str(tmp_path / "b_moved.jsonl"), "--tolerance", "2e-4").returncode == 0
