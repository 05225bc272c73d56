"""Batch-size ramp-up and the LR schedule's mapping from iterations to samples (training.py)."""
import pytest

from megatron_lite.arguments import parse
from megatron_lite.training import NumMicroBatchesCalculator, train_iters

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "64"]


def test_rampup_follows_megatron_rule():
    cfg = parse([*BASE, "--global-batch-size", "32", "--rampup-batch-size", "8", "8", "96"], world_size=2)
    calc = NumMicroBatchesCalculator(cfg)
    seen = []
    consumed = 0
    while consumed < 200:
        calc.update(consumed)
        seen.append(calc.global_batch_size)
        assert calc.num_microbatches == calc.global_batch_size // (2 * 2)
        consumed += calc.global_batch_size
    # 3 increments of 8 over 96 samples: +8 every 32 consumed samples, then 32 for good.
    assert seen[:6] == [8, 8, 8, 8, 16, 16] and seen[-1] == 32
    assert all(b % 4 == 0 for b in seen) and sorted(seen) == seen


def test_train_iters_from_samples():
    cfg = parse([*BASE, "--global-batch-size", "8", "--train-samples", "100"], world_size=1)
    assert train_iters(cfg) == 13
    cfg = parse([*BASE, "--global-batch-size", "8", "--train-iters", "7"], world_size=1)
    assert train_iters(cfg) == 7


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root", "WSD"])
def test_lr_scheduler_counts_samples(style):
    import torch

    from megatron_lite.training import build_lr_scheduler

    class _Opt:
        param_groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.0, "weight_decay": 0.0,
                         "wd_mult": 1.0, "lr_mult": 1.0}]

    cfg = parse([*BASE, "--global-batch-size", "8", "--train-iters", "10", "--lr", "0.1", "--min-lr", "0.01",
                 "--lr-warmup-iters", "2", "--lr-decay-style", style, "--lr-wsd-decay-iters", "4"], world_size=1)
    sched = build_lr_scheduler(cfg, _Opt())
    lrs = []
    for _ in range(10):
        sched.step(increment=8)
        lrs.append(sched.get_lr())
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)  # linear warm-up over 2 iterations
    if style == "constant":
        assert all(lr == pytest.approx(0.1) for lr in lrs[1:])
    elif style != "inverse-square-root":
        assert lrs[-1] == pytest.approx(0.01)  # decayed to --min-lr at --train-iters
    assert all(lr >= 0.01 - 1e-12 for lr in lrs)
