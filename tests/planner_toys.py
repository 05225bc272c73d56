"""A small GPT trained on real gloo ranks for the planner's validation tests: what a run reports (memory
report, measured activations, step time) per rank, for one layout after another in one spawn.

Driven through the entry points pretrain_gpt.py uses (training.initialize, setup_model_and_optimizer with
pretrain_gpt.model_provider, training.train_step with pretrain_gpt.forward_step), with the layout written
into the Config by the planner's own planner.layout.apply -- so the run is exactly the plan.
"""
from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = 64


def base_config(global_batch: int = 16, hidden: int = 64, seq: int = 32, layers: int = 8, heads: int = 8):
    """The small GPT (GPT-2 style, fp32, no dropout) every planner validation uses."""
    from megatron_lite.config import Config
    cfg = Config()
    m, o, t = cfg.model, cfg.optimizer, cfg.training
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = layers, hidden, heads, seq, VOCAB
    m.make_vocab_size_divisible_by = 8
    m.hidden_dropout = m.attention_dropout = 0.0
    o.lr, o.weight_decay = 1e-3, 0.0
    t.global_batch_size, t.train_iters, t.seed = global_batch, 100, 1234
    cfg.parallel.ddp_bucket_size = 4000  # several buckets per chunk, so the padding rules are exercised
    return cfg


def layout_config(base, layout):
    from megatron_lite.planner.layout import apply
    cfg = apply(base, layout)
    return cfg.validate()


def _batches(cfg, dp: int, dp_rank: int, step: int) -> list[dict]:
    gbs, seq, mbs = cfg.training.global_batch_size, cfg.model.seq_length, cfg.training.micro_batch_size
    tokens = torch.randint(0, VOCAB, (gbs, seq + 1), generator=torch.Generator().manual_seed(100 + step))
    local = tokens.chunk(dp)[dp_rank]
    # clone, not contiguous(): a one-row slice is already contiguous, and a view would keep (and the
    # activation meter count) the whole batch's storage wherever a layer saves the ids or labels
    return [{"tokens": s[:, :-1].clone(), "labels": s[:, 1:].clone(), "loss_mask": torch.ones(mbs, seq),
             "position_ids": torch.arange(seq)[None].expand(mbs, seq).contiguous()} for s in local.split(mbs)]


def run_layout(base, layout, timed_steps: int = 0, warmup: int = 0) -> dict:
    """On every rank: the memory report, the first step's measured activations and ZeRO-3 gathered bytes
    and (timed_steps > 0) the median wall time of the steps after `warmup`."""
    import pretrain_gpt
    from megatron_lite import collectives
    from megatron_lite import parallel_state as ps
    from megatron_lite.optimizer import memory_report
    from megatron_lite.planner.measure import measure_step_activations, measure_zero3_gathered
    from megatron_lite.training import initialize, setup_model_and_optimizer, train_step
    cfg = layout_config(base, layout)
    try:
        groups = initialize(cfg)
        model, optimizer, scheduler = setup_model_and_optimizer(cfg, partial(pretrain_gpt.model_provider, cfg))
        report = memory_report(model, optimizer)
        dp, dp_rank = groups.dp.size, groups.dp.rank
        num_micro = cfg.num_microbatches

        def step(index: int):
            data = _batches(cfg, dp, dp_rank, index)
            return train_step(cfg, partial(pretrain_gpt.forward_step, cfg), [iter(data) for _ in model], model,
                              optimizer, scheduler, num_micro, cfg.training.global_batch_size, groups)
        gathered = {}

        def first_step():
            gathered["bytes"] = measure_zero3_gathered(model, lambda: step(0))
        activations = measure_step_activations(model, first_step)
        times = []
        for index in range(1, 1 + warmup + timed_steps):
            collectives.barrier()
            start = time.perf_counter()
            step(index)
            collectives.barrier()
            times.append(time.perf_counter() - start)
        return {"report": report, "activations": activations, "zero3_gathered": gathered["bytes"],
                "pp_rank": groups.pp.rank,
                "dp_rank": groups.dp_cp.rank, "tp_rank": groups.tp.rank,
                "step_time": statistics.median(times[warmup:]) if timed_steps else None}
    finally:
        ps.destroy_model_parallel()


def run_layouts(base, layouts: list, timed_steps: int = 0, warmup: int = 0) -> list:
    out = []
    for layout in layouts:
        try:
            out.append(run_layout(base, layout, timed_steps, warmup))
        except Exception as error:
            raise RuntimeError(f"layout {layout} failed: {error}") from error
    return out


def run_cases(cases: list, timed_steps: int = 0, warmup: int = 0) -> list:
    """run_layouts for (base config, layout) pairs: model variants (SwiGLU, MoE, ...) in one spawn."""
    out = []
    for base, layout in cases:
        try:
            out.append(run_layout(base, layout, timed_steps, warmup))
        except Exception as error:
            raise RuntimeError(f"layout {layout} failed: {error}") from error
    return out
