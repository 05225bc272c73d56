"""Fault injection: damaged or changed training data.

Injects a truncated .bin, an .idx that belongs to another .bin (different size, or the same size with
other sequence boundaries), and a dataset regenerated or re-blended between a save and a resume.
Asserts each stops the job before training with a message naming the file (or dataset) and a fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from cli import REPO, TINY, command, env, read_jsonl
from megatron_lite.data.builder import data_fingerprint, fingerprint_differences
from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, write_index

VOCAB = 101


def _make(prefix: str, documents: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(documents):
        length = int(rng.integers(20, 60))
        builder.add_document(rng.integers(0, VOCAB - 1, size=length), [length])
    builder.finalize(f"{prefix}.idx")
    return prefix


def test_idx_of_another_bin_is_refused_naming_both_files(tmp_path):
    """Injects: (1) the .idx of a smaller dataset next to a larger .bin; (2) an .idx with the same total size
    but other sequence boundaries. Asserts: IndexedDataset names the .bin/.idx and says they do not match."""
    big, small = _make(str(tmp_path / "big"), 30), _make(str(tmp_path / "small"), 10, seed=1)
    shutil.copy(f"{small}.idx", f"{big}.idx")
    with pytest.raises(IndexedDatasetError, match=r"big\.bin: does not match its index .*big\.idx"):
        IndexedDataset(big)
    _make(big, 30)
    dataset = IndexedDataset(big)
    lengths = np.asarray(dataset.sequence_lengths).copy()
    pointers, docs = np.asarray(dataset.index.sequence_pointers).copy(), np.asarray(dataset.document_indices).copy()
    assert lengths[0] != lengths[1]
    lengths[[0, 1]] = lengths[[1, 0]]  # same total bytes, boundaries no longer match the pointers
    write_index(f"{big}.idx", dataset.dtype, lengths, pointers, docs)
    with pytest.raises(IndexedDatasetError, match=r"big\.idx: does not match .*big\.bin"):
        IndexedDataset(big)


def test_fingerprint_names_what_changed(tmp_path):
    """Injects: a dataset regenerated with more documents, and a changed blend weight. Asserts: the
    fingerprint differences name the dataset prefix and the blend; the same data gives none."""
    a, b = _make(str(tmp_path / "a"), 20), _make(str(tmp_path / "b"), 20, seed=1)
    saved = data_fingerprint(["0.3", a, "0.7", b], "98,1,1", False)
    assert fingerprint_differences(saved, data_fingerprint(["0.3", a, "0.7", b], "98,1,1", False)) == []
    _make(b, 25, seed=1)
    grown = fingerprint_differences(saved, data_fingerprint(["0.3", a, "0.7", b], "98,1,1", False))
    assert len(grown) == 1 and grown[0].startswith(f"dataset 1 ({b})") and "'documents': 20" in grown[0]
    reblended = fingerprint_differences(saved, data_fingerprint(["0.5", a, "0.5", b], "98,1,1", False))
    assert any(line.startswith("blend weights: [0.3, 0.7] (checkpoint) vs [0.5, 0.5] (now)") for line in reblended)


def _pretrain(args: list[str], tmp_path, name: str):
    metrics = tmp_path / f"{name}.jsonl"
    proc = subprocess.run(command(1, [*args, "--metrics-jsonl", str(metrics)]), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr, read_jsonl(metrics)


@pytest.mark.slow  # four pretrain_gpt.py runs (~1.5 min on 2 busy cores)
def test_resume_on_changed_or_truncated_data_stops_before_training(tmp_path):
    """Injects: train 2 iterations on a dataset and save; regenerate it with more documents; resume. Then
    truncate its .bin; resume again. Asserts: each resume exits 1 with one error naming the dataset (and
    iteration 2) or the .bin, before any iteration runs; --allow-data-change resumes on the new data."""
    data = _make(str(tmp_path / "corpus"), 40)
    ckpt = tmp_path / "ckpt"
    base = [a for a in TINY if a != "--mock-data"] + ["--data-path", data, "--eval-iters", "0", "--lr-decay-iters", "10", "--save", str(ckpt),
                                                      "--load", str(ckpt)]
    rc, output, records = _pretrain([*base, "--train-iters", "2"], tmp_path, "first")
    assert rc == 0 and len([r for r in records if "record" not in r]) == 2, output[-3000:]
    _make(data, 45)
    rc, output, records = _pretrain([*base, "--train-iters", "4"], tmp_path, "changed")
    assert rc == 1 and [r for r in records if "record" not in r] == [], output[-3000:]
    assert f"training data differs from the data of iteration 2: dataset 0 ({data})" in output
    assert "--allow-data-change" in output and "Traceback" not in output
    with open(f"{data}.bin", "r+b") as handle:
        handle.truncate(os.path.getsize(f"{data}.bin") - 10)
    rc, output, records = _pretrain([*base, "--train-iters", "4"], tmp_path, "truncated")
    assert rc == 1 and [r for r in records if "record" not in r] == [] and f"{data}.bin: data file truncated" in output, output[-3000:]
    _make(data, 45)
    rc, output, records = _pretrain([*base, "--train-iters", "3", "--allow-data-change"], tmp_path, "allowed")
    assert rc == 0 and [r["iteration"] for r in records if "record" not in r] == [3], output[-3000:]
