"""Checkpoints on 4 gloo ranks: TP2 x PP2 save -> bitwise resume in the same layout (model, optimizer,
scheduler, RNG) and resharded loads into TP1 x PP4, TP4 x PP1, TP1 x PP2 x VP2 x DP2 and TP2 x DP2,
each compared exactly against the saved state rebuilt in the test process (by checkpoint_toys'
expected_full/expected_shard: index arithmetic independent of the loader's own helpers)."""
import torch
import torch.distributed as dist

import checkpoint_toys as toys
from megatron_lite import parallel_state as ps
from megatron_lite.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of
from megatron_lite.testing import run_distributed

LAYERS = 4


def _config(tp: int, pp: int, vp=None, **checkpoint) -> Config:
    cfg = Config(world_size=4)
    cfg.model.num_layers, cfg.model.hidden_size = LAYERS, toys.HIDDEN
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = toys.VOCAB, toys.DIVISIBLE_BY
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.virtual_pipeline_model_parallel_size = vp
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def _build(tp: int, pp: int, vp=None):
    ps.initialize_model_parallel(tp, pp, vp)
    chunks = toys.build_chunks(LAYERS, ps.get_tensor_model_parallel_rank(), tp,
                               ps.get_pipeline_model_parallel_rank(), pp, vp, tied=True)
    return chunks, toys.ToyAdam(chunks), toys.ToyScheduler()


def _state(chunks, optimizer, scheduler) -> dict:
    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_world_size(),
            "model": {n: p.detach().clone() for n, p in toys.named(chunks).items()},
            "meta": {n: (shard_spec_of(p), tuple(p.shape)) for n, p in toys.named(chunks).items()},
            "optim": optimizer.get_parameter_state(), "common": optimizer.state_dict(), "sched": scheduler.state_dict()}


def _checkpoint_ranks(directory: str) -> dict:
    out = {}
    # 1. Train and save in TP2 x PP2, then run the reference continuation.
    chunks, opt, sched = _build(2, 2)
    torch.manual_seed(100 + dist.get_rank())
    for _ in range(2):
        toys.train_step(chunks, opt, sched)
    save_checkpoint(2, chunks, opt, sched, 32, _config(2, 2, save=directory))
    out["saved"] = _state(chunks, opt, sched)
    for _ in range(2):
        toys.train_step(chunks, opt, sched)
    out["continued"] = _state(chunks, opt, sched)
    ps.destroy_model_parallel()

    # 2. Resume in the same layout: bitwise equal, continuation included (RNG restored).
    chunks, opt, sched = _build(2, 2)
    torch.manual_seed(7)
    out["resume_result"] = load_checkpoint(chunks, opt, sched, _config(2, 2, load=directory))
    out["resumed"] = _state(chunks, opt, sched)
    for _ in range(2):
        toys.train_step(chunks, opt, sched)
    out["resumed_continued"] = _state(chunks, opt, sched)
    ps.destroy_model_parallel()

    # 3. Other layouts: return what each rank loaded.
    for key, (tp, pp, vp) in {"tp1pp4": (1, 4, None), "tp4pp1": (4, 1, None), "tp1pp2vp2dp2": (1, 2, 2),
                              "tp2pp1dp2": (2, 1, None)}.items():
        chunks, opt, sched = _build(tp, pp, vp)
        out[key + "_result"] = load_checkpoint(chunks, opt, sched, _config(tp, pp, vp, load=directory))
        out[key] = _state(chunks, opt, sched)
        ps.destroy_model_parallel()

    # 4. A mismatch on one pipeline stage only: every rank raises the same error (no rank left hanging).
    ps.initialize_model_parallel(2, 2)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    chunks = toys.build_chunks(LAYERS, ps.get_tensor_model_parallel_rank(), 2, pp_rank, 2, tied=True,
                               hidden=16 if pp_rank == 1 else toys.HIDDEN)
    try:
        load_checkpoint(chunks, None, None, _config(2, 2, load=directory))
        out["mismatch_error"] = None
    except CheckpointError as error:
        out["mismatch_error"] = str(error)
    ps.destroy_model_parallel()
    return out


def _full_tensors(rank_states: list[dict]) -> tuple[dict, dict]:
    """Rebuild every parameter's (and optimizer state's) canonical full tensor from the TP2 x PP2 ranks."""
    shards, optim, metas = {}, {}, {}
    for state in rank_states:
        for name, tensor in state["model"].items():
            shards.setdefault(name, {})[state["tp_rank"]] = tensor
            optim.setdefault(name, {})[state["tp_rank"]] = state["optim"][name]
            metas[name] = state["meta"][name]
    full = {n: toys.expected_full([s[t] for t in sorted(s)], metas[n]) for n, s in shards.items()}
    full_optim = {n: {k: toys.expected_full([o[t][k] for t in sorted(o)], metas[n]) for k in o[0]} for n, o in optim.items()}
    return full, full_optim


def test_save_resume_and_reshard_on_four_ranks(tmp_path):
    results = run_distributed(_checkpoint_ranks, 4, directory=str(tmp_path))
    for out in results:
        assert out["resume_result"] == (2, 32)
        toys.assert_same_states(out["saved"], out["resumed"])
        toys.assert_same_states(out["continued"], out["resumed_continued"])
    full, full_optim = _full_tensors([out["saved"] for out in results])
    assert "output_layer.weight" in full  # the tied copy exists on the last stage ...
    assert torch.equal(full["output_layer.weight"], full["embedding.word_embeddings.weight"])  # ... and equals it
    for layout in ("tp1pp4", "tp4pp1", "tp1pp2vp2dp2", "tp2pp1dp2"):
        seen = set()
        for out in results:
            assert out[layout + "_result"] == (2, 32), layout
            state = out[layout]
            for name, tensor in state["model"].items():
                meta = state["meta"][name]
                expected = toys.expected_shard(full[name], meta, state["tp_rank"], state["tp"])
                assert torch.equal(tensor, expected), (layout, name)
                for key, value in state["optim"][name].items():
                    assert torch.equal(value, toys.expected_shard(full_optim[name][key], meta, state["tp_rank"], state["tp"])), \
                        (layout, name, key)
                seen.add(name)
            assert state["common"] == results[0]["saved"]["common"] and state["sched"] == {"num_steps": 2}
        expected_names = set(full) - ({"output_layer.weight"} if layout.startswith("tp4pp1") or layout.startswith("tp2pp1") else set())
        assert seen == expected_names, layout
    message = results[0]["mismatch_error"]
    assert message and all(out["mismatch_error"] == message for out in results), "ranks disagree on the error"
    assert "decoder.layers.3.mlp.linear_fc2.weight: checkpoint shape [8, 12] vs model shape [16, 12]" in message
    assert "embedding.word_embeddings.weight" not in message  # the first stage fits
