"""Sharded checkpoint writes (issue 19 item 1) on 4 gloo ranks with the real GPTModel, DDP and the
distributed optimizer (DP4, small buckets, so parameters straddle DP shard boundaries):

- every rank writes its own optimizer file holding exactly its own DP slices, and the model replicas'
  writes are spread over the DP ranks (one copy of each parameter); no tensor collective runs during the
  save (only the small object reports), so no rank ever receives another rank's optimizer slice;
- the same-layout load reads only the files holding its own slices and restores every state bitwise;
- --async-save (background writer, finalized later) writes the same checkpoint as a synchronous save;
- offline, without torch.distributed: tools/checkpoint/inspect.py --verify and a reshard to TP 2
  (checkpoint_io.reshard_checkpoint, what convert.py runs) read the sharded files exactly.
"""
import os
import subprocess
import sys

import torch

from megatron_lite import collectives, parallel_state as ps
from megatron_lite.checkpoint_io import CheckpointReader, reshard_checkpoint
from megatron_lite.checkpointing import (_files_read, _named_params, _layout, finalize_pending_save,
                                         load_checkpoint, pending_save_iteration, save_checkpoint)
from megatron_lite.testing import run_distributed

from test_checkpoint_gpt import GLOBAL_BATCH, _config, _setup, _state, _train_step


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
