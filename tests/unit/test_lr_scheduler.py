"""OptimizerParamScheduler follows Megatron's formulas (checked against closed forms at chosen steps)."""
import math

import pytest

from megatron_lite.optimizer.lr_scheduler import OptimizerParamScheduler


class FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.1, "wd_mult": 1.0, "lr_mult": 1.0},
                             {"lr": 0.0, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 1.0}]


def make(style, warmup=10, decay=110, **kw):
    return OptimizerParamScheduler(FakeOptimizer(), init_lr=0.0, max_lr=1.0, min_lr=0.1, lr_warmup_steps=warmup,
                                   lr_decay_steps=decay, lr_decay_style=style, **kw)


def lr_at(sched, step):
    sched.num_steps = 0
    sched.step(step)
    return sched.optimizer.param_groups[0]["lr"]


def test_warmup_then_decay_styles():
    for style in ("constant", "linear", "cosine", "inverse-square-root"):
        s = make(style)
        assert lr_at(s, 0) == 0.0 and lr_at(s, 5) == pytest.approx(0.5) and lr_at(s, 10) == pytest.approx(1.0)
    assert lr_at(make("constant"), 1000) == 1.0
    assert lr_at(make("linear"), 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(make("cosine"), 60) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert lr_at(make("cosine"), 110) == pytest.approx(0.1)
    assert lr_at(make("inverse-square-root"), 40) == pytest.approx(math.sqrt(10) / math.sqrt(40))
    for style in ("linear", "cosine", "inverse-square-root"):
        assert lr_at(make(style), 500) == pytest.approx(0.1)  # past the decay: min_lr


def test_wsd():
    for wsd_style, expected in [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5 ** 0.5 - 1)]:
        s = make("WSD", wsd_decay_steps=20, lr_wsd_decay_style=wsd_style)
        assert lr_at(s, 90) == pytest.approx(1.0)  # stable phase up to decay - wsd
        assert lr_at(s, 100) == pytest.approx(0.1 + 0.9 * expected)
        assert lr_at(s, 110) == pytest.approx(0.1, abs=1e-12)


def test_weight_decay_constant_and_no_decay_group_untouched():
    s = make("linear", start_wd=0.1, end_wd=0.1)
    s.step(30)
    assert [g["weight_decay"] for g in s.optimizer.param_groups] == [0.1, 0.0]
    s2 = make("linear")  # default: the optimizer's configured weight decay, kept constant
    assert s2.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    s3 = make("linear", start_wd=0.0, end_wd=0.2, wd_incr_steps=100, wd_incr_style="linear")
    s3.step(50)
    assert s3.get_wd() == pytest.approx(0.1)


def test_state_dict_roundtrip_and_sample_steps():
    s = make("cosine", warmup=320, decay=3200)  # counted in samples: 32 per iteration
    for _ in range(20):
        s.step(32)
    t = make("cosine", warmup=320, decay=3200)
    t.load_state_dict(s.state_dict())
    assert t.num_steps == 640 and t.optimizer.param_groups[0]["lr"] == s.optimizer.param_groups[0]["lr"]
    strict = OptimizerParamScheduler(FakeOptimizer(), 0.0, 2.0, 0.1, 320, 3200, "cosine",
                                     use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="learning rate"):
        strict.load_state_dict(s.state_dict())


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make("linear", warmup=200, decay=100)
    with pytest.raises(ValueError):
        make("WSD")
