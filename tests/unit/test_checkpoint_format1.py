"""Format 1 checkpoints (before sharded writes: no `pieces`/`shard_shapes`, each shard whole in `files[i]`
and its optim_ twin) still load: a one-process save is rewritten to format 1's manifest and must resume
to the same model and optimizer state; a format the reader does not know is refused with a message."""
import json
import os

import pytest
import torch

import checkpoint_toys as toys
from megatron_lite.checkpoint_io import CheckpointError, CheckpointReader
from megatron_lite.checkpointing import load_checkpoint, save_checkpoint
from test_checkpoint import make_config, make_state, snapshot


def _rewrite(path: str, **changes) -> None:
    metadata_path = os.path.join(path, "iter_0000002", "metadata.json")
    metadata = json.load(open(metadata_path))
    for entry in metadata["params"].values():
        entry.pop("pieces", None)
        entry.pop("shard_shapes", None)
    metadata.update(changes)
    with open(metadata_path, "w") as handle:
        json.dump(metadata, handle)


def test_format1_manifest_loads_and_unknown_version_is_refused(tmp_path):
    chunks, opt, sched = make_state()
    for _ in range(2):
        toys.train_step(chunks, opt, sched)
    save_checkpoint(2, chunks, opt, sched, 16, make_config(save=str(tmp_path)))
    saved = snapshot(chunks, opt, sched)
    entry = json.load(open(tmp_path / "iter_0000002" / "metadata.json"))["params"]["decoder.layers.0.mlp.linear_fc1.weight"]
    assert entry["pieces"]["optim"] == [[["optim_tp0_pp0.pt", 0, torch.Size(entry["shard_shapes"][0]).numel()]]]
    _rewrite(str(tmp_path), format_version=1)
    reader = CheckpointReader(str(tmp_path))
    assert not reader.params["decoder.layers.0.mlp.linear_fc1.weight"].pieces
    fresh, fresh_opt, fresh_sched = make_state()
    assert load_checkpoint(fresh, fresh_opt, fresh_sched, make_config(load=str(tmp_path))) == (2, 16)
    toys.assert_same_states(saved, snapshot(fresh, fresh_opt, fresh_sched))
    _rewrite(str(tmp_path), format_version=3)
    with pytest.raises(CheckpointError, match="format version 3"):
        CheckpointReader(str(tmp_path))
