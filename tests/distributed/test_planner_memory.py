"""The planner's memory model against what 8 gloo ranks report (issue 18's memory validation).

For each layout (TP x PP x VP x DP x DP sharding strategy x recompute, SP with TP > 1) of a small GPT on
8 ranks, every rank runs one real training step and reports optimizer.memory.memory_report and the step's
peak saved-activation bytes (planner/measure.py). The planner's prediction for that rank (its pipeline
stage and DP rank) must equal params, grads, main params and optimizer states exactly, and be within
10% of the measured activations. The default suite runs a representative subset (every dimension's
values at least once); the slow suite runs every valid layout.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner_toys import base_config, layout_config, run_layouts  # noqa: E402

from megatron_lite.config import ConfigError  # noqa: E402

from megatron_lite.planner.layout import Layout  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402

WORLD = 8
ACTIVATION_RTOL = 0.10
STATE_KEYS = ("params", "grads", "main_params", "optimizer_states")

REPRESENTATIVE = [
    Layout(tp=1, pp=1, dp=8, strategy="no_shard"),
    Layout(tp=2, pp=2, dp=2, sp=True, strategy="optim", recompute="selective"),
    Layout(tp=2, pp=4, vp=2, dp=1, sp=True, recompute="full"),
    Layout(tp=1, pp=2, vp=2, dp=4, strategy="optim_grads", mbs=2),
    Layout(tp=4, pp=1, dp=2, sp=False, strategy="optim_grads", recompute="full"),
    Layout(tp=8, pp=1, dp=1, sp=True),
    Layout(tp=1, pp=8, dp=1, recompute="selective"),
]


def all_layouts() -> list[Layout]:
    out = []
    for tp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
        if WORLD % (tp * pp):
            continue
        dp = WORLD // (tp * pp)
        for vp, strategy, recompute, sp in itertools.product((1, 2), ("no_shard", "optim", "optim_grads"),
                                                             ("none", "selective", "full"), (False, True)):
            if (vp > 1 and pp == 1) or (sp and tp == 1) or (strategy != "no_shard" and dp == 1):
                continue
            layout = Layout(tp=tp, pp=pp, vp=vp, dp=dp, sp=sp, recompute=recompute, strategy=strategy)
            try:
                layout_config(base_config(), layout)  # config.validate() decides what is valid
            except ConfigError:
                continue
            out.append(layout)
    return out


def check(layouts: list[Layout], timeout: float) -> None:
    from megatron_lite.planner.activations import ModelShape, activation_bytes
    from megatron_lite.planner.layout import num_microbatches, prepare
    from megatron_lite.planner.predict import schedule_for
    from megatron_lite.planner.states import rank_state_bytes
    base = base_config()
    results = run_distributed(run_layouts, WORLD, timeout=timeout, base=base, layouts=layouts)
    cfg = prepare(base)
    worst = 0.0
    for index, layout in enumerate(layouts):
        shape = ModelShape.of(cfg, layout.tp)
        m = num_microbatches(cfg, layout)
        schedule = schedule_for(layout, m)
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            predicted = rank_state_bytes(cfg, layout, got["pp_rank"], got["dp_rank"], got["tp_rank"])
            for key in STATE_KEYS:
                assert predicted[key] == got["report"][key], (layout, rank, key, predicted[key], got["report"][key])
            act = activation_bytes(shape, layout, schedule, m, got["pp_rank"])
            error = abs(act - got["activations"]) / got["activations"]
            worst = max(worst, error)
            assert error <= ACTIVATION_RTOL, (layout, rank, schedule, act, got["activations"], f"{error:.1%}")
    print(f"planner memory: {len(layouts)} layouts x {WORLD} ranks, states exact, worst activation error {worst:.2%}")


def test_planner_memory_representative():
    check(REPRESENTATIVE, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_planner_memory_every_layout():
    check(all_layouts(), timeout=3600)
