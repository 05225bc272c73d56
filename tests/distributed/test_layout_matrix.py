"""The layout matrix (tests/layout_matrix.py) against one process of the same dtype.

Each case trains STEPS Adam steps of an 8-layer model on the same global batches, through the high-level
entry points (training.initialize, training.setup_model_and_optimizer with pretrain_gpt.model_provider,
training.train_step with pretrain_gpt.forward_step), and is compared with the one-process run of the
same model and dtype:
- the loss of every step and the global grad norm of the first step;
- every parameter's gradient of the first step (before any update), gathered to its canonical full
  shape (TP shards joined, ZeRO-1/2 shards all-gathered over DP x CP, the tied output copy checked equal to the
  embedding's), divided by the loss scale under fp16.

Tolerances. fp32: layouts only reorder sums, so 1e-5 relative: losses within 1e-5 x |loss|, each
gradient element within 1e-5 x (|g| + max |g| of its tensor). bf16 and fp16: rounding happens at other
points in each layout, so the yardstick is what rounding to that dtype costs one process at all: the
distance between the one-process run in that dtype and the one-process fp32 run. Each layout must stay
within LOW_PRECISION_FACTOR times that distance (per step for losses, per tensor in relative L2 norm
for gradients, floored at the fp32 tolerance); measured ratios are in the constant's comment.

Cases run batched: one spawn per world size, every case of that size in turn (groups destroyed and
rebuilt between cases), so the default suite costs a few spawns.
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # pretrain_gpt.py (the model provider and forward step users run)
sys.path.insert(0, str(REPO / "tests"))

import layout_matrix as matrix  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402

SEQ, VOCAB, GLOBAL_BATCH, STEPS = matrix.SEQ_LENGTH, 60, 8, 2
FP32_RTOL = 1e-5
LOW_PRECISION_FACTOR = 4.0  # measured: see the module docstring and the report printed by _compare


# ---- configuration, and the entry points of the code under test: the ONE place that builds or drives it ----
def make_config(case: dict):
    """A validated Config for one case (the options of layout_matrix.DIMENSIONS applied one by one)."""
    from megatron_lite.config import Config
    cfg = Config(world_size=matrix.world_size(case))
    m, p, o, t = cfg.model, cfg.parallel, cfg.optimizer, cfg.training
    m.num_layers, m.hidden_size, m.seq_length, m.vocab_size = matrix.NUM_LAYERS, 32, SEQ, VOCAB
    m.make_vocab_size_divisible_by = 4
    m.hidden_dropout = m.attention_dropout = 0.0
    if case["model"] == "gpt2":
        m.num_attention_heads, m.ffn_hidden_size = 4, 64
    else:  # llama
        m.num_attention_heads, m.group_query_attention, m.num_query_groups, m.ffn_hidden_size = 8, True, 4, 48
        m.position_embedding_type, m.normalization, m.swiglu = "rope", "RMSNorm", True
        m.add_bias_linear, m.untie_embeddings_and_output_weights = False, True
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = case["tp"], case["pp"]
    if case["vp"] > 1:
        p.virtual_pipeline_model_parallel_size = case["vp"]
    p.sequence_parallel = case["sp"]
    p.context_parallel_size = case["cp"]
    p.data_parallel_sharding_strategy = {"none": "no_shard", "zero1": "optim", "zero2": "optim_grads",
                                       "zero3": "optim_grads_params"}[case["zero"]]
    p.use_distributed_optimizer = case["zero"] != "none"
    p.overlap_grad_reduce = case["overlap"]
    p.overlap_param_gather = case["overlap"] and case["zero"] != "none"
    p.ddp_bucket_size = 2000  # several buckets per chunk
    if case["schedule"] != "auto":
        p.pipeline_schedule = case["schedule"]
    p.overlap_p2p_comm = case["p2p_overlap"]
    if case["stages"] == "uneven":  # first stage lighter, last heavier (PP 2: 3 + 5; PP 4: 1 + 2 + 2 + 3)
        p.decoder_first_pipeline_num_layers = 3 if case["pp"] == 2 else 1
        p.decoder_last_pipeline_num_layers = None if case["pp"] == 2 else 3
    if case["recompute"] != "none":
        m.recompute_granularity = case["recompute"]
        m.recompute_method = "uniform" if case["recompute"] == "full" else None
    o.bf16, o.fp16 = case["dtype"] == "bf16", case["dtype"] == "fp16"
    if o.fp16:
        o.initial_loss_scale = 2.0 ** 12
    o.lr, o.weight_decay, o.clip_grad = 1e-3, 0.1, 1.0
    t.micro_batch_size, t.global_batch_size, t.seed, t.train_iters = 1, GLOBAL_BATCH, 1234, 10
    return cfg.validate()


def build(cfg):
    """Groups, model chunks (DDP-wrapped), optimizer and LR scheduler, through the entry points pretrain_gpt
    uses. `groups` is what training.initialize returns: None before process groups were passed explicitly
    (issue 13), a ProcessGroups after; step() and gather() below take it either way."""
    import pretrain_gpt
    from megatron_lite.training import initialize, setup_model_and_optimizer
    groups = initialize(cfg)
    return (groups, *setup_model_and_optimizer(cfg, partial(pretrain_gpt.model_provider, cfg)))


def step(cfg, groups, data_iterators, model, optimizer, scheduler, num_micro: int):
    """One training step (training.train_step with pretrain_gpt's forward step)."""
    import pretrain_gpt
    from megatron_lite.training import train_step
    return train_step(cfg, partial(pretrain_gpt.forward_step, cfg), data_iterators, model, optimizer, scheduler,
                      num_micro, GLOBAL_BATCH, *([] if groups is None else [groups]))


def gather(param, tensor, groups) -> torch.Tensor:
    """`tensor` (a shard shaped like `param`) joined over TP into the canonical full shape."""
    from megatron_lite.tensor_parallel import gather_full_param
    return gather_full_param(param, tensor, **({} if groups is None else {"group": groups.tp}))


# ---- one case on every rank ----------------------------------------------------------------------------
def _batches(step: int, dp: int, dp_rank: int) -> list[dict]:
    """This DP rank's micro-batches of global batch `step` (the same global batches in every layout)."""
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(500 + step))
    local = tokens.chunk(dp)[dp_rank]
    return [{"tokens": s[:, :-1].contiguous(), "labels": s[:, 1:].contiguous(), "loss_mask": torch.ones(1, SEQ),
             "position_ids": torch.arange(SEQ)[None]} for s in local.split(1)]


def _full_grads(model, optimizer, groups) -> dict:
    """Every parameter's reduced gradient (divided by the loss scale), in its canonical full shape."""
    from megatron_lite import collectives
    scale = float(optimizer.get_loss_scale().reshape(-1)[0])
    grads: dict[int, torch.Tensor] = {}
    for chunk in model:
        for buffer in chunk.param_and_grad_buffers:
            if buffer.shard_grads:
                # ZeRO-2/3 keep only this rank's reduced shard of each bucket: rebuild the bucket from every rank's.
                for bucket in buffer.buckets:
                    start, end = bucket.shard_range(buffer.dp_rank, buffer.dp_size)
                    full = torch.zeros(bucket.numel, dtype=bucket.grad_shard.dtype, device=bucket.grad_shard.device)
                    full[start:end] = bucket.grad_shard
                    collectives.all_reduce(full, group=buffer.dp_group)
                    for param in bucket.params:
                        first, last = buffer.param_index[id(param)]
                        grads[id(param)] = full[first - bucket.offset:last - bucket.offset].view(param.shape)
            elif buffer.use_distributed_optimizer and buffer.dp_size > 1:
                # ZeRO-1 left only this rank's shard reduced: rebuild each bucket from every rank's shard.
                # The own shard's values are unchanged (others add zeros there), so the optimizer is unaffected.
                for bucket in buffer.buckets:
                    start, end = bucket.shard_range(buffer.dp_rank, buffer.dp_size)
                    full = torch.zeros_like(bucket.grad_data)
                    full[start:end] = bucket.grad_data[start:end]
                    collectives.all_reduce(full, group=buffer.dp_group)
                    bucket.grad_data.copy_(full)
    return {name: gather(param, grads.get(id(param), param.main_grad).view(param.shape), groups).float() / scale
            for chunk in model for name, param in getattr(chunk, "module", chunk).named_parameters()}  # global names


class _GradsBeforeStep:
    """The optimizer, seen by train_step, that records the full gradients just before it steps."""

    def __init__(self, optimizer, model, groups):
        self._optimizer, self._model, self._groups, self.grads = optimizer, model, groups, None

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def step(self, **kwargs):
        self.grads = _full_grads(self._model, self._optimizer, self._groups)
        return self._optimizer.step(**kwargs)


def _train_case(case: dict) -> dict:
    from megatron_lite import parallel_state as ps
    cfg = make_config(case)
    try:
        groups, model, optimizer, scheduler = build(cfg)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        num_micro = GLOBAL_BATCH // dp
        losses, norms, grads = [], [], None
        for index in range(STEPS):
            recorder = _GradsBeforeStep(optimizer, model, groups)
            data = _batches(index, dp, dp_rank)
            loss, ok, norm, _ = step(cfg, groups, [iter(data) for _ in model], model, recorder, scheduler, num_micro)
            assert ok, f"step {index} skipped (fp16 overflow?)"
            losses.append(loss)
            norms.append(norm)
            grads = recorder.grads if index == 0 else grads
        reporter = ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
        return {"losses": losses if groups.is_loss_stage else None, "norms": norms,  # rank 0 with ZB-V
                "grads": grads if reporter else {}}
    finally:
        ps.destroy_model_parallel()


def _run_cases(cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        try:
            out.append(_train_case(case))
        except Exception as error:  # name the case; the harness adds the rank and the traceback
            raise RuntimeError(f"layout case {matrix.case_id(case)} failed: {error}") from error
    return out


def _merge(rank_results: list[list[dict]], index: int) -> dict:
    grads: dict = {}
    for per_rank in rank_results:
        grads.update(per_rank[index]["grads"])
    losses = [r[index]["losses"] for r in rank_results if r[index]["losses"] is not None]
    assert losses and all(item == losses[0] for item in losses), "loss-stage ranks disagree on the loss"
    norms = [r[index]["norms"] for r in rank_results]
    assert all(n == norms[0] for n in norms), "ranks disagree on the grad norm"
    return {"losses": losses[0], "norms": norms[0], "grads": grads}


# ---- comparison ----------------------------------------------------------------------------------------
def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _compare(got: dict, ref: dict, ref_fp32: dict, dtype: str, case_name: str) -> dict:
    """Assert one case against its reference; return the measured ratios (for the docstring's numbers)."""
    grads, expected = got["grads"], ref["grads"]
    tied_copy = "output_layer.weight" in grads and "output_layer.weight" not in expected
    if tied_copy:  # the last stage's copy of the tied embedding gets the same (all-reduced) gradient
        torch.testing.assert_close(grads.pop("output_layer.weight"), grads["embedding.word_embeddings.weight"],
                                   rtol=0, atol=0, msg=lambda m: f"{case_name}: tied copy: {m}")
    assert set(grads) == set(expected), (case_name, sorted(set(grads) ^ set(expected)))
    ratios = {"loss": 0.0, "grad": 0.0}
    if dtype == "fp32":
        assert got["losses"] == pytest.approx(ref["losses"], rel=FP32_RTOL), case_name
        assert got["norms"][0] == pytest.approx(ref["norms"][0], rel=FP32_RTOL), case_name
        for name, value in expected.items():
            atol = FP32_RTOL * value.abs().max().item()
            torch.testing.assert_close(grads[name], value, rtol=FP32_RTOL, atol=atol, msg=lambda m: f"{case_name} {name}: {m}")
        return ratios
    for step, (loss, ref_loss, exact) in enumerate(zip(got["losses"], ref["losses"], ref_fp32["losses"])):
        yardstick = max(abs(ref_loss - exact), FP32_RTOL * abs(exact))
        ratios["loss"] = max(ratios["loss"], abs(loss - ref_loss) / yardstick)
        assert abs(loss - ref_loss) <= LOW_PRECISION_FACTOR * yardstick, \
            f"{case_name} step {step}: loss {loss} vs one-process {dtype} {ref_loss} (fp32 {exact})"
    for name, value in expected.items():
        yardstick = max(_rel_l2(value, ref_fp32["grads"][name]), FP32_RTOL)
        error = _rel_l2(grads[name], value)
        ratios["grad"] = max(ratios["grad"], error / yardstick)
        assert error <= LOW_PRECISION_FACTOR * yardstick, \
            f"{case_name} {name}: relative L2 error {error:.2e} vs one-process {dtype}, whose own error vs fp32 is {yardstick:.2e}"
    return ratios


def _references(cases: list[dict]) -> dict:
    """One process for every (model, dtype) the cases need, plus fp32 of each model (the yardstick)."""
    keys = sorted({(c["model"], c["dtype"]) for c in cases} | {(c["model"], "fp32") for c in cases})
    plain = {name: values[0] for name, (values, _) in matrix.DIMENSIONS.items()}
    ref_cases = [dict(plain, model=model, dtype=dtype) for model, dtype in keys]
    results = run_distributed(_run_cases, 1, cases=ref_cases, timeout=600)
    return {key: _merge(results, i) for i, key in enumerate(keys)}


def check_cases(cases: list[dict], timeout: float = 600) -> None:
    refs = _references(cases)
    worst = {(dtype, kind): 0.0 for dtype in ("bf16", "fp16") for kind in ("loss", "grad")}
    for world in sorted({matrix.world_size(c) for c in cases}):
        group = [c for c in cases if matrix.world_size(c) == world]
        results = run_distributed(_run_cases, world, cases=group, timeout=timeout)
        for index, case in enumerate(group):
            got = _merge(results, index)
            ratios = _compare(got, refs[(case["model"], case["dtype"])], refs[(case["model"], "fp32")], case["dtype"],
                              matrix.case_id(case))
            for kind in ("loss", "grad"):
                if case["dtype"] != "fp32":
                    worst[(case["dtype"], kind)] = max(worst[(case["dtype"], kind)], ratios[kind])
    print(f"layout matrix: {len(cases)} cases; largest error as a multiple of the one-process rounding yardstick "
          f"(limit {LOW_PRECISION_FACTOR}): " + ", ".join(f"{d} {k} {v:.3g}" for (d, k), v in worst.items()))


# ---- the suites ----------------------------------------------------------------------------------------
def test_default_suite_is_pairwise_and_valid():
    """Every pair of option values that occurs in a valid case occurs in the default suite."""
    default, full = matrix.pairwise_cases(), matrix.all_cases()
    needed = set(map(int, matrix._pair_ids(full).ravel()))
    assert set(map(int, matrix._pair_ids(default).ravel())) == needed
    assert all(matrix.is_valid(c) for c in default) and len({matrix.case_id(c) for c in full}) == len(full)
    for case in full:  # the slow suite holds no case the configuration refuses
        make_config(case)


def test_readme_lists_exactly_the_tested_layouts():
    readme = (REPO / "README.md").read_text()
    assert matrix.readme_section(readme) == matrix.render(), \
        "README.md's layout matrix section is stale: run `python tests/layout_matrix.py --write-readme`"


def test_layout_matrix_pairwise():
    check_cases(matrix.pairwise_cases())


@pytest.mark.matrix_full  # its own marker (not `slow`), so `pytest -m slow` stays a run of minutes
@pytest.mark.timeout(0)  # thousands of cases: hours on a CPU
def test_layout_matrix_full_product():
    cases = matrix.all_cases()
    for world in sorted({matrix.world_size(c) for c in cases}):
        group = [c for c in cases if matrix.world_size(c) == world]
        for start in range(0, len(group), 50):  # a spawn per 50 cases keeps each run's deadline meaningful
            check_cases(group[start:start + 50], timeout=3600)
