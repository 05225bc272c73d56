"""Fault injection: damaged checkpoint files (truncated, bit-flipped, lost) and checkpoints written before
the manifest recorded checksums.

Every test saves a small checkpoint, damages one file on disk, and asserts the load fails before any
tensor is used, within seconds, with a CheckpointError naming the file and the iteration (on every rank
in the distributed case), and that tools/checkpoint/inspect.py --verify reports the same file.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

import checkpoint_toys as toys
from megatron_lite import parallel_state as ps
from megatron_lite.checkpoint_io import CheckpointError, CheckpointReader
from megatron_lite.checkpointing import load_checkpoint, save_checkpoint
from megatron_lite.config import Config
from megatron_lite.testing import DistributedTestError, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = 2


def _config(world: int = 1, tp: int = 1, **checkpoint) -> Config:
    cfg = Config(world_size=world)
    cfg.model.num_layers, cfg.model.hidden_size = LAYERS, toys.HIDDEN
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = toys.VOCAB, toys.DIVISIBLE_BY
    cfg.parallel.tensor_model_parallel_size = tp
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def _state():
    chunks = toys.build_chunks(LAYERS, 0, 1, 0, 1, tied=False)
    return chunks, toys.ToyAdam(chunks), toys.ToyScheduler()


def _saved(tmp_path) -> str:
    chunks, opt, sched = _state()
    toys.train_step(chunks, opt, sched)
    return save_checkpoint(3, chunks, opt, sched, 24, _config(save=str(tmp_path)))


def _truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        value = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([value ^ 0x10]))


def _inspect_cli(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "inspect.py"), path, "--verify"],
                          capture_output=True, text=True, timeout=120)


def _inspect_verify(path: str, capsys) -> tuple[int, str]:
    """inspect.py --verify in this process (a subprocess per case would cost seconds of imports)."""
    spec = importlib.util.spec_from_file_location("tool_inspect", os.path.join(ROOT, "tools", "checkpoint", "inspect.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    saved_path = list(sys.path)
    try:
        spec.loader.exec_module(module)
        capsys.readouterr()
        rc = module.main([path, "--verify"])
    finally:
        sys.path[:] = saved_path
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("damage, filename, needle", [
    (_truncate, "model_tp0_pp0.pt", "is {size} bytes, the manifest says"),
    (_flip_byte, "optim_tp0_pp0.pt", "CRC-32"),
    (_truncate, "common.pt", "is {size} bytes, the manifest says"),
    (os.remove, "rng_rank0.pt", "is missing"),
])
def test_damaged_file_fails_the_load_naming_file_and_iteration(tmp_path, capsys, damage, filename, needle):
    """Injects: one file truncated to half, one byte flipped, or a file deleted. Asserts: load_checkpoint
    raises CheckpointError naming the file and 'iteration 3' in under 10 s, and inspect.py --verify exits 1
    with the same file flagged DAMAGED; the undamaged checkpoint verifies and loads."""
    path = _saved(tmp_path)
    assert _inspect_verify(str(tmp_path), capsys)[0] == 0
    target = os.path.join(path, filename)
    damage(target)
    chunks, opt, sched = _state()
    start = time.time()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(chunks, opt, sched, _config(load=str(tmp_path)))
    size = os.path.getsize(target) if os.path.exists(target) else 0
    message = str(info.value)
    assert f"{target}" in message and "(iteration 3)" in message and needle.format(size=size) in message, message
    assert time.time() - start < 10
    rc, out = _inspect_verify(str(tmp_path), capsys)
    assert rc == 1 and f"DAMAGED: {target}" in out, out


def test_checkpoint_without_checksums_still_loads_and_says_so(tmp_path):
    """Injects: the manifest's 'files' record removed (a checkpoint written before checksums). Asserts: it
    loads (iteration 3) with a warning that its files are not verified; inspect --verify says the same."""
    path = _saved(tmp_path)
    metadata_path = os.path.join(path, "metadata.json")
    metadata = json.load(open(metadata_path))
    assert set(metadata["files"]) == {"model_tp0_pp0.pt", "optim_tp0_pp0.pt", "common.pt", "rng_rank0.pt"}
    del metadata["files"]
    json.dump(metadata, open(metadata_path, "w"))
    chunks, opt, sched = _state()
    with pytest.warns(UserWarning, match="without verification"):
        assert load_checkpoint(chunks, opt, sched, _config(load=str(tmp_path))) == (3, 24)
    report = _inspect_cli(str(tmp_path))
    assert report.returncode == 0 and "nothing to verify" in report.stdout, report.stdout + report.stderr
    assert not CheckpointReader(str(tmp_path)).has_checksums


def _load_damaged(directory: str) -> str:
    ps.initialize_model_parallel(2, 1)
    chunks = toys.build_chunks(LAYERS, ps.get_tensor_model_parallel_rank(), 2, 0, 1, tied=False)
    opt, sched = toys.ToyAdam(chunks), toys.ToyScheduler()
    toys.train_step(chunks, opt, sched)
    save_checkpoint(5, chunks, opt, sched, 40, _config(2, 2, save=directory))
    dist.barrier()
    if dist.get_rank() == 0:
        _truncate(os.path.join(directory, "iter_0000005", "rng_rank1.pt"))  # only rank 1 reads it
    dist.barrier()
    try:
        load_checkpoint(chunks, opt, sched, _config(2, 2, load=directory))
    except CheckpointError as error:
        return str(error)
    return "loaded"


def test_damaged_file_read_by_one_rank_fails_every_rank(tmp_path):
    """Injects: on 2 ranks (TP=2), rank 1's RNG file truncated after the save. Asserts: both ranks raise
    CheckpointError naming rng_rank1.pt and iteration 5 (rank 0 never reads the file: the ranks agree on
    the problems before loading), instead of rank 1 failing alone and rank 0 waiting in a collective."""
    try:
        messages = run_distributed(_load_damaged, 2, timeout=120, directory=str(tmp_path))
    except DistributedTestError as error:
        raise AssertionError(str(error)) from None
    for message in messages:
        assert "rng_rank1.pt (iteration 5) is" in message and "truncated or damaged" in message, message
