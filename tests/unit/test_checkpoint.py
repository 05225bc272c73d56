"""Checkpoint library tests in one process: round trip, resume, flags, crash safety, offline
reader/writer resharding, and shape-mismatch errors."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import checkpoint_toys as toys
from megatron_lite import checkpoint_io, checkpoint_offline, checkpointing
from megatron_lite.checkpoint_io import CheckpointError, CheckpointReader
from megatron_lite.checkpoint_offline import write_checkpoint_from_full_tensors
from megatron_lite.checkpointing import load_checkpoint, read_tracker, save_checkpoint
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.shard_spec import ShardSpec
from megatron_lite.tensor_parallel.utils import shard_of_full

LAYERS = 2


def make_config(**checkpoint) -> Config:
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size = LAYERS, toys.HIDDEN
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = toys.VOCAB, toys.DIVISIBLE_BY
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def make_state(hidden: int = toys.HIDDEN, tied: bool = False):
    chunks = toys.build_chunks(LAYERS, 0, 1, 0, 1, tied=tied, hidden=hidden)
    return chunks, toys.ToyAdam(chunks), toys.ToyScheduler()


def snapshot(chunks, optimizer, scheduler) -> dict:
    return {"model": {n: p.detach().clone() for n, p in toys.named(chunks).items()},
            "optim": optimizer.get_parameter_state(), "common": optimizer.state_dict(),
            "sched": scheduler.state_dict()}


def test_round_trip_and_bitwise_resume(tmp_path):
    cfg = make_config(save=str(tmp_path))
    chunks, opt, sched = make_state()
    for _ in range(2):
        toys.train_step(chunks, opt, sched)
    path = save_checkpoint(2, chunks, opt, sched, consumed_samples=16, config=cfg)
    assert path == str(tmp_path / "iter_0000002") and read_tracker(str(tmp_path)) == 2
    saved = snapshot(chunks, opt, sched)
    for _ in range(3):  # the reference continuation, RNG included
        toys.train_step(chunks, opt, sched)
    reference = snapshot(chunks, opt, sched)

    chunks2, opt2, sched2 = make_state()
    torch.manual_seed(999)  # a different RNG stream that the checkpoint must replace
    assert load_checkpoint(chunks2, opt2, sched2, make_config(load=str(tmp_path))) == (2, 16)
    toys.assert_same_states(saved, snapshot(chunks2, opt2, sched2))
    for _ in range(3):
        toys.train_step(chunks2, opt2, sched2)
    toys.assert_same_states(reference, snapshot(chunks2, opt2, sched2))

    # Format: metadata describes every parameter and the saving layout; files as documented.
    meta = json.load(open(tmp_path / "iter_0000002" / "metadata.json"))
    assert meta["iteration"] == 2 and meta["consumed_samples"] == 16 and meta["has_optimizer"]
    assert meta["layout"]["tp"] == 1 and meta["config"]["model"]["num_layers"] == LAYERS
    fc1 = meta["params"]["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1["partition_stride"] == 2 and fc1["files"] == ["model_tp0_pp0.pt"]
    assert sorted(os.listdir(tmp_path / "iter_0000002")) == ["common.pt", "metadata.json", "model_tp0_pp0.pt",
                                                              "optim_tp0_pp0.pt", "rng_rank0.pt"]


def test_flags_finetune_no_optim_no_rng_and_fresh_start(tmp_path):
    assert load_checkpoint([], None, None, make_config(load=str(tmp_path / "missing"))) == (0, 0)
    chunks, opt, sched = make_state()
    toys.train_step(chunks, opt, sched)
    save_checkpoint(1, chunks, opt, sched, 8, make_config(save=str(tmp_path), no_save_optim=True))
    assert not os.path.exists(tmp_path / "iter_0000001" / "optim_tp0_pp0.pt")

    fresh, fresh_opt, fresh_sched = make_state()
    with pytest.raises(CheckpointError, match="--no-load-optim"):
        load_checkpoint(fresh, fresh_opt, fresh_sched, make_config(load=str(tmp_path)))
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    result = load_checkpoint(fresh, fresh_opt, fresh_sched, make_config(load=str(tmp_path), no_load_optim=True, no_load_rng=True))
    assert result == (1, 8) and torch.equal(torch.rand(3), expected_draw)  # RNG untouched
    for name, param in toys.named(chunks).items():
        assert torch.equal(toys.named(fresh)[name], param)
        assert torch.equal(fresh_opt.state[name]["param"], param)  # main params follow the loaded weights
    assert fresh_sched.num_steps == 0 and fresh_opt.steps == 0

    tuned, tuned_opt, tuned_sched = make_state()
    assert load_checkpoint(tuned, tuned_opt, tuned_sched, make_config(load=str(tmp_path), finetune=True)) == (0, 0)
    assert torch.equal(toys.named(tuned)["decoder.layers.1.mlp.linear_fc2.weight"],
                       toys.named(chunks)["decoder.layers.1.mlp.linear_fc2.weight"])


def test_shape_mismatch_names_the_shapes(tmp_path):
    chunks, opt, sched = make_state(hidden=16)
    save_checkpoint(3, chunks, opt, sched, 0, make_config(save=str(tmp_path)))
    small, small_opt, small_sched = make_state(hidden=8)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small, small_opt, small_sched, make_config(load=str(tmp_path)))
    message = str(info.value)
    assert "decoder.layers.0.mlp.linear_fc1.weight: checkpoint shape [24, 16] vs model shape [24, 8]" in message
    assert "Fix:" in message
    # A model with fewer layers: the checkpoint's extra parameters are named.
    short = [toys.ToyChunk([0], True, True, 0, 1, LAYERS, tied=False, hidden=16)]
    with pytest.raises(CheckpointError, match="decoder.layers.1.mlp.linear_fc2.weight: in the checkpoint but not in the model"):
        load_checkpoint(short, None, None, make_config(load=str(tmp_path)))


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg = make_config(save=str(tmp_path), load=str(tmp_path))
    chunks, opt, sched = make_state()
    save_checkpoint(1, chunks, opt, sched, 8, cfg)
    before = snapshot(chunks, opt, sched)
    toys.train_step(chunks, opt, sched)
    real_save, calls = checkpoint_io.atomic_torch_save, []

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save(obj, path)

    monkeypatch.setattr(checkpointing, "atomic_torch_save", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(2, chunks, opt, sched, 16, cfg)
    monkeypatch.undo()
    assert read_tracker(str(tmp_path)) == 1 and os.path.isdir(tmp_path / "iter_0000002.tmp")
    assert not os.path.exists(tmp_path / "iter_0000002")
    restored, restored_opt, restored_sched = make_state()
    assert load_checkpoint(restored, restored_opt, restored_sched, cfg) == (1, 8)
    toys.assert_same_states(before, snapshot(restored, restored_opt, restored_sched))
    # The next save cleans the stale .tmp; saving the same iteration again replaces it.
    save_checkpoint(2, chunks, opt, sched, 16, cfg)
    save_checkpoint(2, chunks, opt, sched, 17, cfg)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt"]
    assert CheckpointReader(str(tmp_path)).consumed_samples == 17


def test_killed_process_mid_save_leaves_last_complete_checkpoint(tmp_path):
    """A real SIGKILL after a few shard files of iteration 2 were written."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        import torch
        import checkpoint_toys as toys
        from megatron_lite import checkpointing
        from megatron_lite.config import Config
        cfg = Config(); cfg.model.num_layers = {LAYERS}; cfg.checkpoint.save = {str(tmp_path)!r}
        chunks = toys.build_chunks({LAYERS}, 0, 1, 0, 1, tied=False)
        opt, sched = toys.ToyAdam(chunks), toys.ToyScheduler()
        toys.train_step(chunks, opt, sched)
        checkpointing.save_checkpoint(1, chunks, opt, sched, 8, cfg)
        real, count = checkpointing.atomic_torch_save, [0]
        def dying(obj, path):
            count[0] += 1
            if count[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real(obj, path)
        checkpointing.atomic_torch_save = dying
        toys.train_step(chunks, opt, sched)
        checkpointing.save_checkpoint(2, chunks, opt, sched, 16, cfg)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert read_tracker(str(tmp_path)) == 1 and os.path.isdir(tmp_path / "iter_0000002.tmp")
    chunks, opt, sched = make_state()
    assert load_checkpoint(chunks, opt, sched, make_config(load=str(tmp_path))) == (1, 8)
    assert sched.num_steps == 1 and opt.steps == 1
    assert os.path.isdir(tmp_path / "iter_0000002.tmp")  # --load of another job's directory leaves it alone
    # Resuming into the same directory (--save D --load D, as an automatic restart does) removes it.
    assert load_checkpoint(chunks, opt, sched, make_config(load=str(tmp_path), save=str(tmp_path))) == (1, 8)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_offline_writer_reader_reshard_exact(tmp_path):
    """HF-import style: full tensors -> TP2 x PP2 files; reader rebuilds every tensor exactly; reshard
    to TP4 x PP1 with optimizer state; and TP-local shards equal shard_of_full of the originals."""
    cfg = make_config()
    specs = toys.param_specs(LAYERS)
    originals = {name: toys.full_tensor(name, spec[0]) for name, spec in specs.items() if name != "output_layer.weight"}
    metas = {name: checkpoint_io.ParamMeta(name=name, shape=list(spec[0]), shard=ShardSpec(
                                               spec[2] if spec[1] else None, spec[3], unpadded_size=spec[4]))
             for name, spec in specs.items() if name in originals}
    optim = {name: {"param": t, "exp_avg": t * 2, "exp_avg_sq": t.abs()} for name, t in originals.items()}
    src = tmp_path / "tp2pp2"
    write_checkpoint_from_full_tensors(str(src), 7, cfg, originals.items(), metas, tp=2, pp=2,
                                       optimizer_states=optim.__getitem__, common={"optimizer": {"steps": 7}})
    reader = CheckpointReader(str(src))
    assert reader.iteration == 7 and reader.layout["tp"] == 2 and reader.has_optimizer()
    assert reader.has_checksums and reader.verify() == []  # the offline writer records every file too
    # Streamed: one part file per layer (and one for the embedding / final norm) per (tp, pp).
    fc1_files = reader.params["decoder.layers.1.mlp.linear_fc1.weight"].files
    assert [re.sub(r"_part\d+", "", f) for f in fc1_files] == ["model_tp0_pp1.pt", "model_tp1_pp1.pt"]
    assert fc1_files[0].replace("tp0", "tp1") == fc1_files[1]
    norm_files = reader.params["decoder.layers.0.input_layernorm.weight"].files
    assert len(norm_files) == 1 and norm_files[0].startswith("model_tp0_pp0_part")
    assert norm_files != reader.params["decoder.layers.1.input_layernorm.weight"].files
    assert all(os.path.isfile(os.path.join(reader.path, "optim_" + f[len("model_"):])) for f in fc1_files)
    embedding_file = reader.params["embedding.word_embeddings.weight"].files[1]
    shard = torch.load(src / "iter_0000007" / embedding_file)["embedding.word_embeddings.weight"]
    assert shard.shape == (28, toys.HIDDEN) and torch.all(shard[25:] == 0)  # vocab 50 padded to 56
    fc1_shard = torch.load(src / "iter_0000007" / fc1_files[1])["decoder.layers.1.mlp.linear_fc1.weight"]
    full_fc1 = originals["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1_shard, torch.cat([full_fc1[6:12], full_fc1[18:24]]))  # stride 2: gate half + up half
    for name, tensor in originals.items():
        assert torch.equal(reader.full_tensor(name), tensor), name
        assert torch.equal(reader.optimizer_full_state(name)["exp_avg"], tensor * 2), name

    dst = tmp_path / "tp4"
    checkpoint_offline.reshard_checkpoint(str(src), str(dst), tp=4, pp=1)
    resharded = CheckpointReader(str(dst))
    assert resharded.layout["tp"] == 4 and resharded.has_optimizer()
    for name, tensor in originals.items():
        assert torch.equal(resharded.full_tensor(name), tensor), name
    assert resharded.common()["optimizer"] == {"steps": 7}
    # And a TP4 model (rank 3) loads its shards of the originals.
    chunk = toys.ToyChunk(list(range(LAYERS)), True, True, 3, 4, LAYERS, tied=True, pp_size=1)
    with torch.no_grad():
        for p in chunk.parameters():
            p.zero_()
    checkpointing._load_model(resharded, checkpointing._named_params([chunk]), {"tp": 4, "tp_rank": 3})
    for name, param in toys.named([chunk]).items():
        assert torch.equal(param, shard_of_full(originals[name], param, 3, 4)), name


def test_writer_places_layers_on_virtual_stages_and_incomplete_checkpoint_is_an_error(tmp_path):
    cfg = make_config()
    cfg.model.num_layers = 4
    specs = toys.param_specs(4)
    metas = {name: checkpoint_io.ParamMeta(name=name, shape=list(spec[0]), shard=ShardSpec(
                                               spec[2] if spec[1] else None, spec[3], unpadded_size=spec[4]))
             for name, spec in specs.items()}
    tensors = {name: toys.full_tensor(name, spec[0]) for name, spec in specs.items()}
    write_checkpoint_from_full_tensors(str(tmp_path), 3, cfg, tensors.__getitem__, metas, tp=1, pp=2, vp=2)
    reader = CheckpointReader(str(tmp_path))
    # PP2 x VP2 over 4 layers: rank 0 holds layers 0 and 2, rank 1 holds 1 and 3 (Megatron's interleaving).
    stages = {i: reader.params[f"decoder.layers.{i}.input_layernorm.weight"].pp_rank for i in range(4)}
    assert stages == {0: 0, 1: 1, 2: 0, 3: 1}
    assert reader.params["embedding.word_embeddings.weight"].pp_rank == 0
    assert reader.params["output_layer.weight"].pp_rank == 1 and reader.layout["vp"] == 2
    assert not reader.has_optimizer() and reader.iteration == 3

    missing = reader.params["output_layer.weight"].files[0]  # a part file of stage 1
    assert missing.startswith("model_tp0_pp1_part")
    os.remove(tmp_path / "iter_0000003" / missing)
    chunks = toys.build_chunks(4, 0, 1, 0, 1, tied=False)
    with pytest.raises(CheckpointError, match=f"{missing} is missing"):
        load_checkpoint(chunks, None, None, make_config(load=str(tmp_path), no_load_rng=True))


def test_independent_shard_rule_against_hand_built_shards():
    """checkpoint_toys.expected_shard/expected_full (the reshard tests' expectations) on shards written
    out by hand from docs/internals.md."""
    rows = torch.arange(8.0).unsqueeze(1).repeat(1, 2)  # row i holds i
    # stride 2 (SwiGLU fc1 [gate; up]) over TP 2: each rank holds its half of the gate, then of the up rows
    fc1 = {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 2, "unpadded_size": None,
           "local_shape": (4, 2)}
    assert toys.expected_shard(rows, fc1, 0, 2)[:, 0].tolist() == [0, 1, 4, 5]
    assert toys.expected_shard(rows, fc1, 1, 2)[:, 0].tolist() == [2, 3, 6, 7]
    # a padded vocabulary of 5 over TP 2 (3 rows each): the last row of rank 1 is padding, zero
    vocab = {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1, "unpadded_size": 5,
             "local_shape": (3, 2)}
    assert toys.expected_shard(rows[:5], vocab, 0, 2)[:, 0].tolist() == [0, 1, 2]
    assert toys.expected_shard(rows[:5], vocab, 1, 2)[:, 0].tolist() == [3, 4, 0]
    # row-parallel (dim 1) over TP 4: column j on rank j // 2
    cols = torch.arange(8.0).unsqueeze(0)
    fc2 = {"tensor_model_parallel": True, "partition_dim": 1, "partition_stride": 1, "unpadded_size": None,
           "local_shape": (1, 2)}
    assert [toys.expected_shard(cols, fc2, r, 4).tolist() for r in range(4)] == [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    for meta, full, tp in ((fc1, rows, 2), (vocab, rows[:5], 2), (fc2, cols, 4)):
        shards = [toys.expected_shard(full, meta, r, tp) for r in range(tp)]
        assert torch.equal(toys.expected_full(shards, meta), full)
    # the same rule from a (spec, local shape) pair, the form a ShardSpec-carrying parameter gives
    from types import SimpleNamespace
    spec = SimpleNamespace(partition_dim=0, stride=2, unpadded_size=None)
    assert torch.equal(toys.expected_shard(rows, (spec, (4, 2)), 1, 2), toys.expected_shard(rows, fc1, 1, 2))
