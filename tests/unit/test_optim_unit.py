"""One-process optimizer checks (no torch.distributed): loss scaler, weight-decay groups, Adam/SGD updates
equal torch's with clipping, bf16 main weights, parameter-state round trip, memory report."""
import copy

import pytest
import torch
from torch import nn

from megatron_lite.config import Config
from megatron_lite.optimizer import get_megatron_optimizer, memory_report
from megatron_lite.optimizer.grad_scaler import DynamicGradScaler


def test_dynamic_scaler_hysteresis_window_and_floor():
    s = DynamicGradScaler(1024.0, min_scale=256.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale.item() == 1024.0  # first overflow tolerated
    s.update(True)
    assert s.scale.item() == 512.0
    for _ in range(3):
        s.update(False)
    assert s.scale.item() == 1024.0  # doubled after the window; hysteresis restored
    s.update(True)
    assert s.scale.item() == 1024.0
    for _ in range(4):
        s.update(True)
    assert s.scale.item() == 256.0  # never below --min-loss-scale
    t = DynamicGradScaler(1.0, 1.0, growth_interval=3, hysteresis=2)
    t.load_state_dict(s.state_dict())
    assert t.scale.item() == 256.0 and t.state_dict()["hysteresis_tracker"] == s.state_dict()["hysteresis_tracker"]


def model_and_config(optimizer="adam", bf16=False, clip=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    cfg = Config()
    o = cfg.optimizer
    o.optimizer, o.lr, o.weight_decay, o.clip_grad, o.bf16 = optimizer, 0.05, 0.1, clip, bf16
    return model, cfg


def run_steps(model, opt, steps=3, dtype=torch.float32):
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
        model(x).float().pow(2).mean().backward()
        result = opt.step()
    return result


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_matches_torch_with_no_decay_group_and_clipping(name):
    model, cfg = model_and_config(name, clip=0.05)
    cfg.logging.log_num_zeros_in_grad = True  # counted only on request (Megatron's --log-num-zeros-in-grad)
    reference = copy.deepcopy(model)
    opt = get_megatron_optimizer(cfg, [model])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]  # 2 weights decay; biases and norm do not
    ok, norm, zeros = run_steps(model, opt)
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    no_decay = [p for p in reference.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    torch_opt = (torch.optim.AdamW(groups, lr=0.05) if name == "adam" else torch.optim.SGD(groups, lr=0.05, momentum=0.9))
    for step in range(3):
        torch_opt.zero_grad()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        reference(x).pow(2).mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        torch_opt.step()
    assert ok and norm == pytest.approx(ref_norm.item(), rel=1e-5) and zeros == 0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # torch clips with 1/(norm + 1e-6) too


def test_bf16_main_params_and_state_roundtrip():
    model, cfg = model_and_config("adam", bf16=True)
    model = model.to(torch.bfloat16)
    opt = get_megatron_optimizer(cfg, [model])
    run_steps(model, opt, dtype=torch.bfloat16)
    state = opt.get_parameter_state()
    for name, p in model.named_parameters():
        assert state[name]["param"].dtype == torch.float32 and state[name]["param"].shape == p.shape
        assert torch.equal(state[name]["param"].to(torch.bfloat16), p.detach())  # model = rounded main
    # A fresh optimizer given the state continues exactly like the original.
    clone_model = copy.deepcopy(model)
    clone = get_megatron_optimizer(cfg, [clone_model])
    clone.load_state_dict(opt.state_dict())
    clone.set_parameter_state(state)
    run_steps(model, opt, steps=1, dtype=torch.bfloat16)
    run_steps(clone_model, clone, steps=1, dtype=torch.bfloat16)
    for p, q in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(p, q)
    mem = memory_report([model], opt)
    assert mem["main_params"] == 4 * mem["num_params"] and mem["optimizer_states"] == 8 * mem["num_params"]


def test_lr_get_set_and_loss_scale_identity():
    model, cfg = model_and_config()
    opt = get_megatron_optimizer(cfg, [model])
    opt.set_lr(0.5)
    assert opt.get_lr() == 0.5 and all(g["lr"] == 0.5 for g in opt.param_groups)
    loss = torch.tensor(2.0)
    assert opt.scale_loss(loss) is loss and opt.get_loss_scale().item() == 1.0


def test_nvme_offload_refuses_a_full_or_unwritable_dir_before_any_step(tmp_path, monkeypatch):
    import shutil
    from megatron_lite.config import ConfigError
    model, cfg = model_and_config()
    cfg.optimizer.optimizer_nvme_offload_dir = str(tmp_path / "nvme")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    with pytest.raises(ConfigError, match="--optimizer-nvme-offload-dir: .* MiB free, this rank needs"):
        get_megatron_optimizer(cfg, [model])
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    (tmp_path / "a_file").write_text("x")
    cfg.optimizer.optimizer_nvme_offload_dir = str(tmp_path / "a_file" / "nvme")  # under a file: not creatable
    with pytest.raises(ConfigError, match="--optimizer-nvme-offload-dir: .* is not writable"):
        cfg.validate()
    cfg.optimizer.optimizer_offload_chunk_mb = 0
    cfg.optimizer.optimizer_nvme_offload_dir = str(tmp_path / "nvme")
    with pytest.raises(ConfigError, match="--optimizer-offload-chunk-mb: must be > 0"):
        cfg.validate()


def test_nvme_offload_steps_like_the_device_and_removes_its_files_on_a_clean_exit(tmp_path):
    import subprocess
    import sys
    model, cfg = model_and_config(clip=0.5)
    reference = copy.deepcopy(model)
    run_steps(reference, get_megatron_optimizer(cfg, [reference]))
    cfg.optimizer.optimizer_nvme_offload_dir = str(tmp_path / "nvme")
    cfg.optimizer.optimizer_offload_chunk_mb = 40 / 2**20  # 10-element chunks: every tensor is stepped in pieces
    opt = get_megatron_optimizer(cfg, [model])
    run_steps(model, opt)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert memory_report([model], opt)["disk"] == 12 * sum(p.numel() for p in model.parameters())
    # A clean interpreter exit without close() removes the files too (weakref.finalize at exit).
    script = ("import torch; from torch import nn; from megatron_lite.config import Config; "
              "from megatron_lite.optimizer import get_megatron_optimizer; cfg = Config(); "
              f"cfg.optimizer.optimizer_nvme_offload_dir = {str(tmp_path / 'exit')!r}; "
              "opt = get_megatron_optimizer(cfg, [nn.Linear(4, 4)]); print(opt.nvme.path)")
    path = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert path.startswith(str(tmp_path / "exit")) and not __import__("os").path.exists(path)
