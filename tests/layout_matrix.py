"""The layout matrix: every parallel option the project promises equals one process, as data.

One generator of cases over DIMENSIONS, pruned by RULES (what 8 ranks and the configuration allow):
- `all_cases()`: the full product (the slow suite, `pytest -m slow`);
- `pairwise_cases()`: a subset in which every pair of option values that can occur together does so at
  least once (the default suite), chosen by a deterministic greedy algorithm that prefers small worlds.
`render()` writes the README's equivalence section from the same data, so the claim is generated, not
written by hand: `python tests/layout_matrix.py --write-readme` regenerates it, and
tests/distributed/test_layout_matrix.py fails when README.md differs.

A new option (a ZeRO strategy, CP, EP, a schedule) is one entry in DIMENSIONS (plus a rule if it
constrains others) and one line in test_layout_matrix.make_config that applies it to a Config.
No torch or megatron_lite import here: rendering is instant.
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np

WORLD_LIMIT = 8
NUM_LAYERS = 8  # divisible by PP x VP for every PP, VP below
SEQ_LENGTH = 8  # tokens per sample

# name -> (values, what it means). The first value of each is the plain choice.
DIMENSIONS: dict[str, tuple[tuple, str]] = {
    "tp": ((1, 2, 4), "tensor-parallel size"),
    "pp": ((1, 2, 4), "pipeline-parallel size"),
    "vp": ((1, 2), "virtual stages per pipeline rank (2: interleaved 1F1B or ZB-V)"),
    "dp": ((1, 2, 4), "data-parallel size"),
    "sp": ((False, True), "sequence parallelism"),
    "cp": ((1, 2), "context-parallel size (ring attention, --cp-comm-type p2p; load-balanced causal chunks)"),
    "zero": (("none", "zero1", "zero2", "zero3"), "data-parallel sharding: none, ZeRO-1 (optimizer states), ZeRO-2 (and gradients) or ZeRO-3 (and parameters, gathered per layer)"),
    "overlap": ((False, True), "overlapped grad reduce (and param all-gather with ZeRO)"),
    "recompute": (("none", "selective", "full"), "activation recomputation"),
    "dtype": (("fp32", "bf16", "fp16"), "parameter/activation dtype (fp16 with dynamic loss scaling)"),
    "schedule": (("auto", "gpipe", "1f1b", "zb-h1", "interleaved", "zbv"),
                 "pipeline schedule (auto: the simulator's pick, ZB-H1 without VP, ZB-V with VP 2)"),
    "p2p_overlap": ((False, True), "--overlap-p2p-comm: pipeline sends/receives posted early, waited for when needed"),
    "stages": (("even", "uneven"), "uneven: first/last stage hold fewer/more layers"),
    "model": (("gpt2", "llama"), "GPT-2 (LayerNorm, GeLU, learned positions, tied) or Llama (RMSNorm, SwiGLU, RoPE, GQA, untied)"),
}
NAMES = tuple(DIMENSIONS)

# (why, predicate): a case is valid when every predicate holds.
RULES: list[tuple[str, Callable[[dict], bool]]] = [
    (f"TP x PP x DP x CP <= {WORLD_LIMIT} ranks", lambda c: world_size(c) <= WORLD_LIMIT),
    ("VP 2 needs PP > 1", lambda c: c["vp"] == 1 or c["pp"] > 1),
    ("sequence parallelism needs TP > 1", lambda c: not c["sp"] or c["tp"] > 1),
    (f"CP splits the {SEQ_LENGTH}-token sequence into 2 x CP chunks (x TP with SP)",
     lambda c: SEQ_LENGTH % (2 * c["cp"] * (c["tp"] if c["sp"] else 1)) == 0 or c["cp"] == 1),
    ("GPipe, 1F1B and ZB-H1 need PP > 1 and VP 1",
     lambda c: c["schedule"] not in ("gpipe", "1f1b", "zb-h1") or (c["pp"] > 1 and c["vp"] == 1)),
    ("interleaved and ZB-V need VP 2", lambda c: c["schedule"] not in ("interleaved", "zbv") or c["vp"] == 2),
    ("--overlap-p2p-comm needs PP > 1", lambda c: not c["p2p_overlap"] or c["pp"] > 1),
    ("uneven stages need PP > 1 and VP 1", lambda c: c["stages"] == "even" or (c["pp"] > 1 and c["vp"] == 1)),
    ("a case that changes nothing but model and dtype is the one-process reference itself",
     lambda c: any(c[n] != DIMENSIONS[n][0][0] for n in NAMES if n not in ("model", "dtype"))),
]


def world_size(case: dict) -> int:
    return case["tp"] * case["pp"] * case["dp"] * case["cp"]


def is_valid(case: dict) -> bool:
    return all(rule(case) for _, rule in RULES)


def case_id(case: dict) -> str:
    """A short, unique, readable name: sizes, then only the options that differ from the plain choice."""
    parts = [f"tp{case['tp']}", f"pp{case['pp']}", f"dp{case['dp']}"] + (["vp2"] if case["vp"] == 2 else [])
    for name in NAMES:
        value, plain = case[name], DIMENSIONS[name][0][0]
        if name not in ("tp", "pp", "dp", "vp") and value != plain:
            parts.append(name if isinstance(value, bool) else value if name == "zero" else f"{name}-{value}")
    return "_".join(parts)


def all_cases() -> list[dict]:
    """Every valid combination (the slow suite), in product order."""
    values = [DIMENSIONS[name][0] for name in NAMES]
    return [case for combo in itertools.product(*values) if is_valid(case := dict(zip(NAMES, combo)))]


def _pair_ids(cases: list[dict]) -> np.ndarray:
    """[cases, pairs-per-case] integer ids of the (dimension, value) pairs each case covers."""
    index = {}
    for i, name in enumerate(NAMES):
        for v in DIMENSIONS[name][0]:
            index[(i, v)] = len(index)
    n = len(index)
    rows = []
    for case in cases:
        slots = [index[(i, case[name])] for i, name in enumerate(NAMES)]
        rows.append([a * n + b for a, b in itertools.combinations(slots, 2)])
    return np.array(rows, dtype=np.int64)


def pairwise_cases() -> list[dict]:
    """Every pair of option values that occurs in some valid case occurs in at least one chosen case.
    Greedy: repeatedly take the valid case covering the most uncovered pairs; ties go to the smaller world
    (cheaper on CPU), then to product order. Deterministic."""
    cases = all_cases()
    pairs = _pair_ids(cases)
    uncovered = np.zeros(int(pairs.max()) + 1, dtype=bool)
    uncovered[np.unique(pairs)] = True
    worlds = np.array([world_size(c) for c in cases])
    chosen = []
    while uncovered.any():
        gain = uncovered[pairs].sum(axis=1)
        best = int(np.lexsort((np.arange(len(cases)), worlds, -gain))[0])
        chosen.append(cases[best])
        uncovered[pairs[best]] = False
    return sorted(chosen, key=lambda c: (world_size(c), case_id(c)))


# ---- the README section ---------------------------------------------------------------------------
BEGIN, END = "<!-- layout-matrix:begin (generated by tests/layout_matrix.py) -->", "<!-- layout-matrix:end -->"


def _cell(value) -> str:
    return {True: "yes", False: "-"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def render() -> str:
    """The README's equivalence section: what the default and the slow suite compare with one process."""
    default, full = pairwise_cases(), all_cases()
    lines = [BEGIN, "",
             "Options (a case picks one value of each; the first is the plain choice):", ""]
    lines += [f"- `{name}` {', '.join(_cell(v) for v in values)}: {meaning}" for name, (values, meaning) in DIMENSIONS.items()]
    lines += ["", "Rules (what " + str(WORLD_LIMIT) + " ranks and the configuration allow): "
              + "; ".join(why for why, _ in RULES) + ".", "",
              f"**Default suite** (`pytest`): these {len(default)} cases, which together hold every pair of option "
              "values that can occur together:", "",
              "| " + " | ".join(NAMES) + " |", "|" + " --- |" * len(NAMES)]
    lines += ["| " + " | ".join(_cell(case[name]) for name in NAMES) + " |" for case in default]
    lines += ["", f"**Full product** (`pytest -m matrix_full`, hours on a CPU): all {len(full)} valid combinations of the options above.", "", END]
    return "\n".join(lines)


def readme_section(text: str) -> str:
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, flags=re.S)
    return match.group(0) if match else ""


def write_readme(path: Path) -> None:
    text = path.read_text()
    section = readme_section(text)
    if not section:
        raise SystemExit(f"{path}: no {BEGIN!r} ... {END!r} markers to replace")
    path.write_text(text.replace(section, render()))


if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[1] / "README.md"
    if "--write-readme" in sys.argv:
        write_readme(readme)
        print(f"wrote the layout matrix section of {readme}")
    else:
        print(render())
