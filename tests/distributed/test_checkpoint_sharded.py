"""Sharded checkpoint writes (issue 19 item 1) on 4 gloo ranks with the real GPTModel, DDP and the
distributed optimizer (DP4, small buckets, so parameters straddle DP shard boundaries):

- every rank writes its own optimizer file holding exactly its own DP slices, and the model replicas'
  writes are spread over the DP ranks (one copy of each parameter); no tensor collective runs during the
  save (only the small object reports), so no rank ever receives another rank's optimizer slice;
- the same-layout load reads only the files holding its own slices and restores every state bitwise;
- --async-save (background writer, finalized later) writes the same checkpoint as a synchronous save;
- offline, without torch.distributed: tools/checkpoint/inspect.py --verify and a reshard to TP 2
  (checkpoint_offline.reshard_checkpoint, what convert.py runs) read the sharded files exactly.
"""
import os
import subprocess
import sys

import pytest
import torch

import checkpoint_toys as toys
from megatron_lite import checkpointing, collectives, parallel_state as ps
from megatron_lite.checkpoint_io import CheckpointReader
from megatron_lite.checkpoint_offline import reshard_checkpoint
from megatron_lite.checkpointing import (_files_read, _named_params, _layout, finalize_pending_save,
                                         load_checkpoint, pending_save_iteration, save_checkpoint)
from megatron_lite.testing import run_distributed

from test_checkpoint_gpt import GLOBAL_BATCH, _check_against_full, _config, _setup, _state, _train_step


def _ranges(optimizer) -> list:
    return sorted((name, start, end) for name, start, end, _ in optimizer.local_parameter_state())


def _sharded(directory: str, async_dir: str) -> dict:
    cfg = _config(4, 1, True, save=directory)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    collectives.reset_comm_stats()
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg)
    out = {"save_comm": collectives.comm_stats(), "ranges": _ranges(optimizer), "saved": _state(ddp, optimizer, scheduler),
           "dp_rank": ps.get_data_parallel_rank()}
    # --async-save: the snapshot is taken now; training goes on; the tracker moves at finalize.
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg, save_dir=async_dir, async_save=True)
    out["pending"] = pending_save_iteration()
    _train_step(ddp, optimizer, scheduler, 2)  # changes every state; the snapshot must not see it
    out["finalized"] = finalize_pending_save()
    ps.destroy_model_parallel()

    cfg = _config(4, 1, True, load=directory)
    ddp, optimizer, scheduler = _setup(cfg)
    reader = CheckpointReader(directory)
    layout, params = _layout(cfg, ps.get_process_groups()), _named_params([ddp])
    ranges: dict = {}
    for name, start, end in _ranges(optimizer):
        ranges.setdefault(name, []).append((start, end))
    out["files_read"] = sorted(set().union(*(_files_read(reader, n, p, layout, ranges.get(n)) for n, p in params.items())))
    out["result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
    out["loaded"] = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()
    return out


def test_dp_ranks_write_and_read_only_their_own_slices(tmp_path):
    directory, async_dir = str(tmp_path / "sync"), str(tmp_path / "async")
    outs = run_distributed(_sharded, 4, timeout=300, directory=directory, async_dir=async_dir)
    iteration = os.path.join(directory, "iter_0000002")
    files = sorted(os.listdir(iteration))
    stems = ["tp0_pp0", "tp0_pp0_dp1", "tp0_pp0_dp2", "tp0_pp0_dp3"]
    assert [f"optim_{s}.pt" for s in stems] == [f for f in files if f.startswith("optim_")], files
    model_files = [f for f in files if f.startswith("model_")]
    assert len(model_files) >= 2, files  # the replicated weights' writes are spread over the DP ranks
    reader = CheckpointReader(directory)
    for out in outs:
        # No tensor collective during the save: only object reports, the publish broadcasts and barriers.
        assert {op for _, op in out["save_comm"]} <= {"all_gather_object", "broadcast_object"}, out["save_comm"]
        own = torch.load(os.path.join(iteration, f"optim_{stems[out['dp_rank']]}.pt"))
        saved_ranges = sorted((key.split("[")[0], *map(int, key.split("[")[1][:-1].split(":"))) if "[" in key
                              else (key, 0, reader.params[key].shard_shapes and
                                    torch.Size(reader.params[key].shard_shapes[0]).numel())
                              for key in own)
        assert saved_ranges == out["ranges"]  # exactly this rank's DP slices, nobody else's
        # The same-layout load reads its own optimizer file and no other rank's.
        read_optim = [f for f in out["files_read"] if f.startswith("optim_")]
        assert read_optim == [f"optim_{stems[out['dp_rank']]}.pt"], out["files_read"]
        assert out["result"] == (2, 2 * GLOBAL_BATCH)
        for name, tensor in out["saved"]["model"].items():
            assert torch.equal(out["loaded"]["model"][name], tensor), name
            for key, value in out["saved"]["optim"][name].items():
                assert torch.equal(out["loaded"]["optim"][name][key], value), (name, key)
        assert out["pending"] == 2 and out["finalized"] == 2
    # The async checkpoint holds the same values as the synchronous one (the snapshot predates step 3).
    async_reader = CheckpointReader(async_dir)
    assert async_reader.verify() == [] and async_reader.iteration == 2
    for name in reader.param_names():
        assert torch.equal(async_reader.full_tensor(name), reader.full_tensor(name)), name
        for key, value in reader.optimizer_full_state(name).items():
            assert torch.equal(async_reader.optimizer_full_state(name)[key], value), (name, key)
    # Offline: the inspect tool verifies every piece file, and a reshard to TP 2 keeps every value.
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tools", "checkpoint", "inspect.py")
    verified = subprocess.run([sys.executable, tool, directory, "--verify"], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and "files match the manifest" in verified.stdout, verified.stdout + verified.stderr
    resharded = CheckpointReader(reshard_checkpoint(directory, str(tmp_path / "tp2"), tp=2))
    assert resharded.layout["tp"] == 2
    for name in reader.param_names():
        assert torch.equal(resharded.full_tensor(name), reader.full_tensor(name)), name
        for key, value in reader.optimizer_full_state(name).items():
            assert torch.equal(resharded.optimizer_full_state(name)[key], value), (name, key)


def _zero3_bf16_resume(directory: str) -> dict:
    cfg = _config(2, 1, True, bf16=True, strategy="optim_grads_params", save=directory, load=directory)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg)
    _train_step(ddp, optimizer, scheduler, 2)
    out = {"reference": _state(ddp, optimizer, scheduler)}
    ps.destroy_model_parallel()
    ddp, optimizer, scheduler = _setup(cfg)
    out["result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
    _train_step(ddp, optimizer, scheduler, 2)
    out["resumed"] = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()
    return out


def test_zero3_bf16_resume_is_bitwise(tmp_path):
    """ZeRO-3 (DP 2, bf16 weights, fp32 main params: the path where the model is written back through
    ZeRO-3's persistent shard) saves sharded, resumes and takes the same next step bit for bit."""
    for out in run_distributed(_zero3_bf16_resume, 2, timeout=300, directory=str(tmp_path)):
        assert out["result"] == (2, 2 * GLOBAL_BATCH)
        for name, tensor in out["reference"]["model"].items():
            assert torch.equal(out["resumed"]["model"][name], tensor), name
            for key, value in out["reference"]["optim"][name].items():
                assert torch.equal(out["resumed"]["optim"][name][key], value), (name, key)


class _RecordingReader(CheckpointReader):
    """The reader load_checkpoint builds, kept so the test sees what it read (pieces_read, bytes_read)."""
    opened: list = []

    def __init__(self, path: str):
        super().__init__(path)
        _RecordingReader.opened.append(self)


def _tensor_ops(stats: dict) -> set:
    return {op for _, op in stats} - {"all_gather_object", "broadcast_object", "barrier"}


def _zero3_save_then_reshard(directory: str) -> dict:
    """ZeRO-3 TP2 x DP2 saves without gathering; TP4 (distributed optimizer, DP1) and ZeRO-3 TP1 x DP4 load it."""
    cfg = _config(4, 2, True, strategy="optim_grads_params", save=directory)
    ddp, optimizer, scheduler = _setup(cfg)
    for step in range(2):
        _train_step(ddp, optimizer, scheduler, step)
    held = {name: [(start, end) for start, end, _ in pieces] for name, (_, pieces) in ddp.local_slices().items()}
    collectives.reset_comm_stats()
    save_checkpoint(2, [ddp], optimizer, scheduler, 2 * GLOBAL_BATCH, cfg)
    out = {"save_ops": _tensor_ops(collectives.comm_stats()), "held": held,
           "unmaterialized_after_save": all(p.untyped_storage().nbytes() == 0 for p in ddp.module.parameters()),
           "stem": f"tp{ps.get_tensor_model_parallel_rank()}_pp0" + (f"_dp{ps.get_data_parallel_rank()}"
                                                                      if ps.get_data_parallel_rank() else "")}
    out["saved"] = _state(ddp, optimizer, scheduler)
    ps.destroy_model_parallel()
    checkpointing.CheckpointReader = _RecordingReader
    try:
        for key, (tp, strategy) in {"tp4": (4, "optim"), "zero3_tp1": (1, "optim_grads_params")}.items():
            cfg = _config(4, tp, True, strategy=strategy, load=directory)
            ddp, optimizer, scheduler = _setup(cfg)
            collectives.reset_comm_stats()
            out[key + "_result"] = load_checkpoint([ddp], optimizer, scheduler, cfg)
            out[key + "_ops"] = _tensor_ops(collectives.comm_stats())
            out[key + "_unmaterialized"] = all(p.untyped_storage().nbytes() == 0 for p in ddp.module.parameters())
            reader = _RecordingReader.opened.pop()
            out[key + "_read"] = (sorted(reader.pieces_read), dict(reader.bytes_read))
            out[key] = _state(ddp, optimizer, scheduler)
            ps.destroy_model_parallel()
    finally:
        checkpointing.CheckpointReader = CheckpointReader
    return out


def _real_values(full: torch.Tensor, meta: tuple, tp_rank: int, tp: int) -> int:
    return int(toys.expected_shard(torch.ones(full.shape), meta, tp_rank, tp).sum())


@pytest.mark.slow  # ~15-25 s (three 4-rank layouts); the fast checks: tests/unit/test_checkpoint_slices.py and
# test_checkpoint_gpt.py's ZeRO-3 chain (no gather on save or load)
def test_zero3_writes_its_slices_and_a_reshard_reads_only_overlapping_pieces(tmp_path):
    """Issue 19 item 1 under ZeRO-3 and for resharding loads:
    - ZeRO-3 (TP2 x DP2) saves with no tensor collective and its parameters never gathered; each rank's
      model file holds only flat slices of the weights inside its own ZeRO-3 shard;
    - loading it into TP4 (DP1), each rank reads only the saved pieces overlapping its TP4 shard: for every
      TP-split parameter (the vocabulary-padded embedding aside) only pieces of TP2 shard tp_rank // 2, and
      in all exactly its shard's real values, model and optimizer state (4 + 3 x 4 bytes per value);
    - both the TP4 load and a ZeRO-3 TP1 x DP4 load (into the shards, never gathered) restore every value
      and optimizer state exactly, and so does an offline reshard (convert.py's path)."""
    directory = str(tmp_path / "zero3_tp2_dp2")
    results = run_distributed(_zero3_save_then_reshard, 4, timeout=300, directory=directory)
    iteration = os.path.join(directory, "iter_0000002")
    reader = CheckpointReader(directory)
    assert reader.verify() == []
    saved = [out["saved"] for out in results]
    shards: dict = {}
    for state in saved[:2]:  # DP rank 0's TP group holds every TP shard
        for name, tensor in state["model"].items():
            shards.setdefault(name, {})[state["tp_rank"]] = (tensor, state["optim"][name], state["meta"][name])
    full = {n: toys.expected_full([s[t][0] for t in sorted(s)], s[0][2]) for n, s in shards.items()}
    full_optim = {n: {k: toys.expected_full([s[t][1][k] for t in sorted(s)], s[0][2]) for k in s[0][1]}
                  for n, s in shards.items()}
    for out in results:
        assert out["save_ops"] == set() and out["unmaterialized_after_save"], out["save_ops"]
        path = os.path.join(iteration, f"model_{out['stem']}.pt")
        written = torch.load(path) if os.path.isfile(path) else {}
        for key in written:  # "name[lo:hi]" (or a bare name: the whole shard), inside this rank's own slices
            name, lo, hi = (key.split("[")[0], *map(int, key.split("[")[1][:-1].split(":"))) if "[" in key else \
                (key, 0, written[key].numel())
            assert any(start <= lo and hi <= end for start, end in out["held"][name]), (key, out["held"][name])
        for layout in ("tp4", "zero3_tp1"):
            assert out[layout + "_result"] == (2, 2 * GLOBAL_BATCH)
            _check_against_full(out[layout], full, full_optim, saved[0])
        assert out["zero3_tp1_ops"] == set() and out["zero3_tp1_unmaterialized"], out["zero3_tp1_ops"]
        state, (pieces, read) = out["tp4"], out["tp4_read"]
        for filename, key in pieces:
            spec, _ = state["meta"][key.split("[")[0]]
            if spec.is_sharded and spec.unpadded_size is None:
                assert filename.startswith(f"model_tp{state['tp_rank'] // 2}_") or \
                    filename.startswith(f"optim_tp{state['tp_rank'] // 2}_"), (filename, key, state["tp_rank"])
        expected = sum(_real_values(full[n], state["meta"][n], state["tp_rank"], 4) * (4 + 4 * len(state["optim"][n]))
                       for n in state["model"])
        assert sum(read.values()) == expected, (sum(read.values()), expected)
    # Offline (convert.py's reshard, no torch.distributed) the ZeRO-3 slices rebuild every tensor exactly.
    offline = CheckpointReader(reshard_checkpoint(directory, str(tmp_path / "offline_tp1"), tp=1))
    for name, tensor in full.items():
        assert torch.equal(offline.full_tensor(name), tensor), name
        for key, value in full_optim[name].items():
            assert torch.equal(offline.full_tensor(name, "optim", key), value), (name, key)
