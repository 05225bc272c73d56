"""--log-loss-spikes: LossSpikeDetector flags a loss more than the threshold's standard deviations above the
previous window's mean (not before the window has 10 values, not NaN), and MetricsLogger writes one
console line and one JSONL record per spike; the flags reject bad values before anything starts."""
import json
import math

import pytest

from megatron_lite.config import Config, ConfigError
from megatron_lite.logging import LossSpikeDetector, MetricsLogger


def test_detector_flags_only_real_spikes():
    detector = LossSpikeDetector(threshold=4.0, window=20)
    losses = [5.0 - 0.01 * i + (0.02 if i % 2 else -0.02) for i in range(30)]
    assert [detector.update(x) for x in losses] == [None] * 30  # noisy but steady descent
    spike = detector.update(6.0)
    assert spike is not None and spike["window"] == 20 and spike["lm_loss"] == 6.0 and spike["z"] > 4.0
    mean = sum(losses[-20:]) / 20
    assert math.isclose(spike["window_mean"], mean)
    assert detector.update(float("nan")) is None and detector.update(None) is None
    early = LossSpikeDetector(threshold=1.0, window=50)
    assert all(early.update(x) is None for x in [1.0] * 9 + [100.0])  # fewer than 10 previous losses: no verdict
    assert early.update(100.0) is not None  # 10 previous: a jump from a flat window counts


def test_logger_writes_console_line_and_record(tmp_path, capsys):
    cfg = Config()
    cfg.logging.metrics_jsonl = str(tmp_path / "m.jsonl")
    logger = MetricsLogger(cfg, 1)
    logger.log_loss_spike(7, {"lm_loss": 9.0, "window_mean": 4.0, "window_std": 0.5, "z": 10.0, "window": 50})
    logger.close()
    assert "loss spike at iteration 7: lm loss 9.000000E+00 is 10.0 standard deviations above the mean" in capsys.readouterr().out
    record = json.loads((tmp_path / "m.jsonl").read_text())
    assert record["record"] == "loss_spike" and record["iteration"] == 7 and record["z"] == 10.0


@pytest.mark.parametrize("field,value,flag", [("loss_spike_threshold", 0.0, "--loss-spike-threshold"),
                                              ("loss_spike_window", 1, "--loss-spike-window")])
def test_bad_spike_flags_are_config_errors(field, value, flag):
    cfg = Config()
    setattr(cfg.logging, field, value)
    with pytest.raises(ConfigError, match=flag):
        cfg.validate()
