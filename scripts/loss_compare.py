#!/usr/bin/env python
"""Train two parallel layouts on the same data and seed and compare their losses iteration by iteration.

Each layout runs as its own job of pretrain_gpt.py (torchrun, gloo on CPU or NCCL on GPUs) with the
common flags plus its own, writing --metrics-jsonl; the losses are printed side by side with their
relative difference, and the exit status is 1 when the largest one exceeds --tolerance (2 when a run
fails). Use it to trust a new layout on your own model before a long run:

    python scripts/loss_compare.py --layout-a "" \\
        --layout-b "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2" --nproc-b 8 \\
        --tolerance 1e-5 -- --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \\
        --micro-batch-size 2 --global-batch-size 16 --mock-data --vocab-size 1000 \\
        --tokenizer-type NullTokenizer --hidden-dropout 0 --attention-dropout 0 --train-iters 20 --lr 3e-4

Flags after `--` are common to both runs (a --config file's parallel sizes are not read here: give
them as flags). A layout of a single flag needs the `=` form (`--layout-b=--sequence-parallel`), since
argparse reads a lone `--flag` value as an option. A run's process count defaults to TP x PP x CP of
its flags (data parallel size 1); give --nproc-a/--nproc-b for data parallelism. The reported loss is each
iteration's global-batch loss, so every layout of the same global batch must agree: in fp32 to ~1e-5
relative (reduction order only), in bf16/fp16 to about 1e-2 (rounding at different points). Turn dropout off: its masks are drawn on
each layout's own ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
_SIZE_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size")


def default_nproc(flags: list[str]) -> int:
    """TP x PP x CP named in `flags` (the last value of each wins, as in the parser; data parallel size 1)."""
    size = 1
    for name in _SIZE_FLAGS:
        size *= int(flag_value(flags, name) or 1)
    return size


def flag_value(flags: list[str], name: str) -> Optional[str]:
    """The last value given for `name` in `flags` (either `--name value` or `--name=value`), else None."""
    value = None
    for i, token in enumerate(flags):
        if token == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def command(nproc: int, flags: list[str]) -> list[str]:
    # --standalone: torchrun's own store picks a free port and the workers reuse it.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(REPO / "pretrain_gpt.py"), *flags]


def train_losses(path: Path) -> dict[int, float]:
    """{iteration: lm loss} of the training records of a --metrics-jsonl file (evaluations skipped)."""
    losses = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "split" not in record and record.get("lm_loss") is not None:
                losses[record["iteration"]] = record["lm_loss"]
    return losses


def run_layout(name: str, nproc: int, common: list[str], layout: list[str], workdir: Path,
               timeout: float) -> dict[int, float]:
    flags = [*common, *layout]
    metrics = workdir / f"{name}.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = command(nproc, [*flags, "--metrics-jsonl", str(metrics)])
    print(f"[{name}] {nproc} process(es): {shlex.join(layout) or '(common flags only)'}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {name} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return train_losses(metrics)


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[list[tuple[int, float, float, float]], float]:
    """Rows (iteration, loss a, loss b, relative difference) and the largest relative difference."""
    if sorted(a) != sorted(b):
        raise ValueError(f"the runs logged different iterations: {sorted(a)} vs {sorted(b)}")
    if not a:
        raise ValueError("no training losses were logged (use --log-interval 1 and --train-iters > 0)")
    rows = [(it, a[it], b[it], abs(a[it] - b[it]) / max(abs(a[it]), 1e-30)) for it in sorted(a)]
    return rows, max(row[3] for row in rows)


def format_table(rows, name_a: str, name_b: str) -> str:
    lines = [f"{'iteration':>9}  {name_a:>16}  {name_b:>16}  {'rel diff':>10}"]
    lines += [f"{it:>9}  {la:>16.9f}  {lb:>16.9f}  {rel:>10.3e}" for it, la, lb, rel in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout-a", default="", help="Flags of the first layout (one string; may be empty).")
    parser.add_argument("--layout-b", default="", help="Flags of the second layout (one string).")
    parser.add_argument("--nproc-a", type=int, default=None, help="Processes of run A (default TP x PP x CP).")
    parser.add_argument("--nproc-b", type=int, default=None, help="Processes of run B (default TP x PP x CP).")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="Largest relative loss difference allowed.")
    parser.add_argument("--workdir", default=None, help="Where the JSONL metrics go (default: a temporary dir).")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds per run.")
    parser.add_argument("--from-jsonl", nargs=2, metavar=("A", "B"), default=None,
                        help="Compare two existing --metrics-jsonl files instead of training.")
    parser.add_argument("common", nargs=argparse.REMAINDER, help="-- then flags common to both runs.")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    common = args.common[1:] if args.common[:1] == ["--"] else args.common
    if "--log-interval" not in common:
        common = [*common, "--log-interval", "1"]  # a loss for every iteration
    flags_a, flags_b = shlex.split(args.layout_a), shlex.split(args.layout_b)
    for flags in (flags_a, flags_b):
        if any(flag_value([*common, *flags], name) not in ("0", "0.0") for name in ("--hidden-dropout", "--attention-dropout")):
            print("note: dropout is on (Megatron's default 0.1): each layout draws its masks on its own ranks, so the "
                  "losses differ by more than rounding; pass --hidden-dropout 0 --attention-dropout 0 to compare layouts.",
                  file=sys.stderr)
            break
    if args.from_jsonl:
        try:
            rows, worst = compare(train_losses(Path(args.from_jsonl[0])), train_losses(Path(args.from_jsonl[1])))
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return report(rows, worst, args.tolerance)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            losses_a = run_layout("a", args.nproc_a or default_nproc([*common, *flags_a]), common, flags_a, workdir,
                                  args.timeout)
            losses_b = run_layout("b", args.nproc_b or default_nproc([*common, *flags_b]), common, flags_b, workdir,
                                  args.timeout)
            rows, worst = compare(losses_a, losses_b)
        except (RuntimeError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return report(rows, worst, args.tolerance)


def report(rows, worst: float, tolerance: float) -> int:
    print(format_table(rows, "loss a", "loss b"))
    worst_it = max(rows, key=lambda row: row[3])[0]
    verdict = "OK" if worst <= tolerance else "FAIL"
    print(f"largest relative difference: {worst:.3e} at iteration {worst_it} (tolerance {tolerance:g}): {verdict}")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
