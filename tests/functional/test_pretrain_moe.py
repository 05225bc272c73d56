"""pretrain_gpt.py with MoE layers as a user runs it: the JSONL metrics carry the MoE keys, and EP 2 with the
alltoall dispatcher (2 ranks, DP 2) reproduces the one-process losses and MoE metrics; (slow) so do context
parallelism 2 with EP 2 folded over DP x CP, and TP 2 + SP with ETP 1 x EP 2 and PP 2 (4 ranks each)."""
from __future__ import annotations

import pytest

from tests.functional.cli import LLAMA, TINY, run, train_losses

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--moe-layer-freq", "[0,1,1,1]",
       "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001", "--moe-shared-expert-intermediate-size", "32",
       "--train-iters", "3"]


def _moe_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "lm_loss" in r and "iteration" in r and "split" not in r]


def test_moe_logs_balancing_metrics_and_ep2_matches_one_process(tmp_path):
    single, out = run(1, TINY + LLAMA + MOE, tmp_path, "moe_single")
    ep2, _ = run(2, TINY + LLAMA + MOE + ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
                 tmp_path, "moe_ep2")
    for records in (single, ep2):
        rows = _moe_records(records)
        assert len(rows) == 3
        for row in rows:
            assert row["load_balancing_loss"] > 0 and row["z_loss"] > 0 and row["expert_load_imbalance"] >= 1.0
            assert "tokens_dropped" not in row  # dropless
    assert "load balancing loss:" in out and "expert load imbalance:" in out
    assert train_losses(ep2) == pytest.approx(train_losses(single), rel=1e-5)
    for a, b in zip(_moe_records(single), _moe_records(ep2)):
        for key in ("load_balancing_loss", "z_loss", "expert_load_imbalance"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_moe_capacity_reports_dropped_tokens(tmp_path):
    records, _ = run(1, TINY + LLAMA + MOE + ["--moe-expert-capacity-factor", "0.5"], tmp_path, "moe_capacity")
    rows = _moe_records(records)
    # capacity 0.5: at most half of the pairs fit, so at least 16 tokens x 2 x 3 layers per micro-batch drop
    assert all(row["tokens_dropped"] >= 8 * 16 * 2 * 3 // 2 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["--context-parallel-size", "2", "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1",
     "--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
], ids=["cp2-ep2", "tp2-sp-etp1-ep2-pp2"])
def test_moe_layouts_on_4_ranks_match_one_process(tmp_path, layout):
    single, _ = run(1, TINY + LLAMA + MOE, tmp_path, "moe_single")
    other, _ = run(4, TINY + LLAMA + MOE + layout, tmp_path, "moe_layout")
    assert train_losses(other) == pytest.approx(train_losses(single), rel=1e-5)
    for a, b in zip(_moe_records(single), _moe_records(other)):
        for key in ("load_balancing_loss", "z_loss", "expert_load_imbalance"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
