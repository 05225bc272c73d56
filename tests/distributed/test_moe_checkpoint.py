"""MoE checkpoints reshard across expert layouts: a run saved at EP 4 resumes at EP 2 (and at TP 2 + SP with
ETP 1, EP 2): the loaded experts equal the saved ones bit for bit, and the next step's loss and update equal
continuing at EP 4 (SGD momentum restored from the optimizer state)."""
from __future__ import annotations

import pytest
import torch

from megatron_lite import parallel_state as ps
from megatron_lite.checkpointing import load_checkpoint, save_checkpoint
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
from megatron_lite.optimizer import get_megatron_optimizer
from megatron_lite.testing import run_distributed
from tests.distributed.test_moe_parallel import SEQ, batch, forward_step, full_params, make_config


def _build(cfg, groups):
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.pipeline import build_model_chunks
    chunks = build_model_chunks(cfg, lambda pre, post, layers: GPTModel(cfg, pre, post, layers, groups=groups), groups)
    model = [DistributedDataParallel(cfg, chunk, groups=groups) for chunk in chunks]
    return chunks, model, get_megatron_optimizer(cfg, model, groups)


def _step(cfg, groups, model, opt, step: int):
    from megatron_lite.pipeline import get_forward_backward_func
    opt.zero_grad()
    local = batch(step).chunk(groups.dp.size)[groups.dp.rank]
    data = [{"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous()} for mb in local.chunk(cfg.num_microbatches)]
    out = get_forward_backward_func(cfg, groups)(
        forward_step_func=forward_step, data_iterator=iter(data), model=model, num_microbatches=cfg.num_microbatches,
        seq_length=SEQ, micro_batch_size=1, config=cfg, no_sync_func=model[0].no_sync,
        finalize_model_grads_func=finalize_model_grads, grad_scale_func=opt.scale_loss)
    assert opt.step()[0]
    return sum(float(d["lm loss"]) for d in out) / len(out)


def _save_then_resume(world: int, save_dir: str, resume_layouts: list[dict]) -> dict:
    ps.initialize_model_parallel(1, 1, None, 1, 4)
    cfg = make_config(world, ep=4)
    groups = ps.get_process_groups()
    chunks, model, opt = _build(cfg, groups)
    _step(cfg, groups, model, opt, 0)
    save_checkpoint(1, model, opt, None, 8, cfg, save_dir, groups)
    saved = full_params(chunks, groups)
    loss = _step(cfg, groups, model, opt, 1)  # continuing at EP 4: the reference for the resumed runs
    result = {"saved": saved, "losses": [loss], "after": [full_params(chunks, groups)], "loaded": []}
    ps.destroy_model_parallel()
    for layout in resume_layouts:
        ps.initialize_model_parallel(layout.get("tp", 1), 1, None, 1, layout["ep"], layout.get("etp"))
        cfg = make_config(world, **layout)
        groups = ps.get_process_groups()
        chunks, model, opt = _build(cfg, groups)
        load_checkpoint(model, opt, None, cfg, save_dir, groups)
        result["loaded"].append(full_params(chunks, groups))
        result["losses"].append(_step(cfg, groups, model, opt, 1))
        result["after"].append(full_params(chunks, groups))
        ps.destroy_model_parallel()
    return result


@pytest.mark.slow
def test_moe_checkpoint_saved_at_ep4_resumes_at_ep2(tmp_path):
    layouts = [dict(ep=2), dict(tp=2, ep=2, etp=1)]
    results = run_distributed(_save_then_resume, 4, world=4, save_dir=str(tmp_path / "ckpt"), resume_layouts=layouts,
                              timeout=600)
    merged = {key: {} for key in ("saved", "loaded0", "loaded1", "after0", "after1", "after2")}
    for r in results:
        merged["saved"].update(r["saved"])
        for i in range(2):
            merged[f"loaded{i}"].update(r["loaded"][i])
        for i in range(3):
            merged[f"after{i}"].update(r["after"][i])
    assert any(".experts.local_experts.3." in name for name in merged["saved"])
    for i in range(2):
        assert set(merged[f"loaded{i}"]) == set(merged["saved"])
        for name, value in merged["saved"].items():
            assert torch.equal(merged[f"loaded{i}"][name], value), f"{layouts[i]}: {name} not restored exactly"
    means = [sum(r["losses"][i] for r in results) / len(results) for i in range(3)]
    assert means[1] == pytest.approx(means[0], rel=1e-6) and means[2] == pytest.approx(means[0], rel=1e-6)
    for i in (1, 2):
        for name, value in merged["after0"].items():
            torch.testing.assert_close(merged[f"after{i}"][name], value, rtol=1e-5, atol=1e-6)
