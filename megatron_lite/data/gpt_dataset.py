"""GPT pretraining samples: seq_length + 1 tokens drawn across document boundaries.

Three indices (Megatron's design), all built with vectorised NumPy:

* document index: the split's document ids, each epoch a fresh permutation, concatenated;
* sample index:   for sample i, (position in the document index, token offset) where its
                  tokens start; sample i covers tokens [i*seq, i*seq + seq] of the stream of
                  shuffled documents, so consecutive samples overlap by one token (the last
                  label of one is the first input of the next);
* shuffle index:  a permutation over samples, so batches mix the whole corpus.

They depend only on the data, the split, seq_length, num_samples and the seed, never on the
parallel layout, and are cached as .npy files under `cache_path` (rank 0 builds, the other
ranks wait at a barrier and load).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from megatron_lite.data.indexed_dataset import IndexedDataset

_INDEX_FORMAT_VERSION = 1


def parse_split(split: str) -> list[float]:
    """'949,50,1' -> normalised [train, valid, test] fractions (missing parts are 0)."""
    try:
        parts = [float(s) for s in str(split).replace("/", ",").split(",") if s.strip() != ""]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected comma-separated numbers such as 949,50,1") from None
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected 1-3 non-negative numbers with a positive sum, e.g. 949,50,1")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def get_split_indices(split: str, num_documents: int) -> list[int]:
    """Document boundaries [0, a, b, num_documents] of the three splits (Megatron's rounding)."""
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    for i in range(1, len(bounds)):
        bounds[i] -= excess
    return [max(0, b) for b in bounds]


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose token stream yields num_samples samples of seq_length + 1 tokens."""
    if tokens_per_epoch <= 0:
        raise ValueError("the split has no tokens; check --data-path and --split")
    # Samples in E epochs = (E * tokens_per_epoch - 1) // seq_length; solve for E directly.
    epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    return int(epochs)


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Each epoch is an independent permutation of the split's documents."""
    tiled = np.tile(np.asarray(documents, dtype=np.int64), (num_epochs, 1))
    return rng.permuted(tiled, axis=1).reshape(-1)


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] int64: (document-index position, offset) where sample i starts."""
    doc_sizes = np.asarray(sizes, dtype=np.int64)[document_index]
    starts = np.zeros(len(doc_sizes) + 1, dtype=np.int64)
    np.cumsum(doc_sizes, out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" then -1: the last document starting at or before the position, which skips
    # empty documents and puts a position that ends a document at offset 0 of the next one.
    doc_pos = np.searchsorted(starts, positions, side="right") - 1
    doc_pos = np.minimum(doc_pos, len(doc_sizes) - 1)
    sample_index = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_index[:, 0] = doc_pos
    sample_index[:, 1] = positions - starts[doc_pos]
    return sample_index


def build_shuffle_index(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(num_samples).astype(np.int64)


def _barrier() -> None:
    """Wait for all ranks when torch.distributed is up (no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from megatron_lite import collectives  # every collective goes through collectives.py

        collectives.barrier()


def _is_builder_rank() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def cached_indices(
    cache_path: str | None, description: dict[str, Any], names: tuple[str, ...], build: Callable[[], tuple[np.ndarray, ...]]
) -> tuple[np.ndarray, ...]:
    """Build index arrays, or load them from `cache_path` under a hash of `description`.

    With torch.distributed initialised, rank 0 builds and saves, every rank waits at a barrier,
    then all load, so each index is built once per job and reused by later jobs.
    """
    if cache_path is None:
        return build()
    text = json.dumps(description, sort_keys=True)
    digest = hashlib.md5(text.encode()).hexdigest()
    prefix = os.path.join(cache_path, f"{digest}-{description['class']}-{description.get('split_name', '')}")
    paths = [f"{prefix}-{name}.npy" for name in names]
    if _is_builder_rank() and not all(os.path.exists(p) for p in paths):
        os.makedirs(cache_path, exist_ok=True)
        arrays = build()
        for path, array in zip(paths, arrays):
            # Write under a temporary name and rename, so a reader never sees half a file.
            tmp = f"{path}.tmp{os.getpid()}.npy"
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, path)
        with open(f"{prefix}-description.json", "w") as f:
            f.write(text)
    _barrier()
    return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)


def get_ltor_masks_and_position_ids(
    tokens: np.ndarray, eod: int, reset_position_ids: bool, reset_attention_mask: bool, eod_mask_loss: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Megatron's masks for one sample: (loss_mask, position_ids, attention_mask or None).

    attention_mask is [1, seq, seq] bool with True = masked out: causal, and with
    reset_attention_mask also no attention across an end-of-document token.
    """
    seq = len(tokens)
    loss_mask = np.ones(seq, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    # A new document starts right after each eod; mark those positions.
    starts = np.zeros(seq, dtype=np.int64)
    eod_positions = np.nonzero(tokens[:-1] == eod)[0] + 1
    starts[eod_positions] = eod_positions
    positions = np.arange(seq, dtype=np.int64)
    if reset_position_ids:
        position_ids = positions - np.maximum.accumulate(starts)
    else:
        position_ids = positions
    attention_mask = None
    if reset_attention_mask:
        segment = np.zeros(seq, dtype=np.int64)
        segment[eod_positions] = 1
        segment = np.cumsum(segment)
        causal = positions[None, :] > positions[:, None]
        attention_mask = (causal | (segment[None, :] != segment[:, None]))[None]
    return loss_mask, position_ids, attention_mask


class GPTDataset(torch.utils.data.Dataset):
    """Samples of a split of an IndexedDataset (or the mock low-level dataset).

    `len()` is every sample the needed epochs provide (>= num_samples requested). Item i is a
    dict of tensors: tokens, labels, loss_mask, position_ids (+ attention_mask on request).
    """

    def __init__(
        self,
        low_level: Any,
        documents: np.ndarray,
        seq_length: int,
        num_samples: int,
        seed: int,
        eod_id: int,
        split_name: str = "train",
        cache_path: str | None = None,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
        eod_mask_loss: bool = False,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1 (got {seq_length})")
        self.low_level = low_level
        self.seq_length = int(seq_length)
        self.eod_id = int(eod_id)
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.eod_mask_loss = eod_mask_loss
        self.split_name = split_name
        documents = np.asarray(documents, dtype=np.int64)
        sizes = np.asarray(low_level.sequence_lengths)
        self.sizes = sizes
        tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
        num_epochs = num_epochs_needed(tokens_per_epoch, self.seq_length, max(int(num_samples), 1))
        total_samples = (num_epochs * tokens_per_epoch - 1) // self.seq_length
        self.description = {
            "class": "GPTDataset",
            "format": _INDEX_FORMAT_VERSION,
            "split_name": split_name,
            "dataset": getattr(low_level, "description", getattr(low_level, "path_prefix", repr(low_level))),
            "num_documents_total": len(sizes),
            "documents": [int(documents[0]), int(documents[-1]), len(documents)] if len(documents) else [],
            "documents_hash": hashlib.md5(documents.tobytes()).hexdigest(),
            "tokens_per_epoch": tokens_per_epoch,
            "seq_length": self.seq_length,
            "num_samples": int(num_samples),
            "seed": int(seed),
        }

        def build() -> tuple[np.ndarray, ...]:
            start = time.perf_counter()
            document_index = build_document_index(documents, num_epochs, np.random.default_rng([seed, 0]))
            sample_index = build_sample_index(sizes, document_index, self.seq_length, total_samples)
            shuffle_index = build_shuffle_index(total_samples, np.random.default_rng([seed, 1]))
            self.build_seconds = time.perf_counter() - start
            return document_index, sample_index, shuffle_index

        self.build_seconds = 0.0
        self.document_index, self.sample_index, self.shuffle_index = cached_indices(
            cache_path, self.description, ("document_index", "sample_index", "shuffle_index"), build
        )
        self.num_epochs = num_epochs

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def get_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample idx (after shuffling), as int64."""
        sample = int(self.shuffle_index[idx])
        doc_pos, offset = (int(x) for x in self.sample_index[sample])
        needed = self.seq_length + 1
        parts = []
        while needed > 0:
            doc = int(self.document_index[doc_pos])
            take = min(int(self.sizes[doc]) - offset, needed)
            if take > 0:
                parts.append(self.low_level.get(doc, offset, take))
                needed -= take
            doc_pos += 1
            offset = 0
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = self.get_tokens(idx)
        tokens, labels = sample[:-1], sample[1:]
        loss_mask, position_ids, attention_mask = get_ltor_masks_and_position_ids(
            tokens, self.eod_id, self.reset_position_ids, self.reset_attention_mask, self.eod_mask_loss
        )
        item = {
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
        }
        if attention_mask is not None:
            item["attention_mask"] = torch.from_numpy(attention_mask)
        return item


class MockLowLevelDataset:
    """Deterministic synthetic documents with the IndexedDataset interface (no files).

    Document lengths come from the seed; document d's tokens from a generator seeded with
    (seed, d), so any document can be produced on demand. Each document ends with eod and
    no other token equals eod.
    """

    def __init__(self, vocab_size: int, eod_id: int, seed: int, num_documents: int = 4096, mean_length: int = 256) -> None:
        if vocab_size is None or vocab_size < 2:
            raise ValueError("--mock-data needs --vocab-size >= 2")
        self.vocab_size, self.eod_id, self.seed = int(vocab_size), int(eod_id), int(seed)
        rng = np.random.default_rng([self.seed, 12345])
        self.sequence_lengths = rng.integers(mean_length // 2 + 1, 2 * mean_length, size=num_documents).astype(np.int32)
        self.document_indices = np.arange(num_documents + 1, dtype=np.int64)
        self.description = f"mock(vocab={self.vocab_size},eod={self.eod_id},seed={self.seed},docs={num_documents},mean={mean_length})"

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def _document(self, doc: int) -> np.ndarray:
        length = int(self.sequence_lengths[doc])
        rng = np.random.default_rng([self.seed, doc])
        tokens = rng.integers(0, self.vocab_size - 1, size=length, dtype=np.int64)
        tokens[tokens >= self.eod_id] += 1  # skip the eod id so only the last token is eod
        tokens[-1] = self.eod_id
        return tokens

    def __getitem__(self, doc: int) -> np.ndarray:
        return self._document(doc)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        tokens = self._document(doc)
        return tokens[offset:] if length is None else tokens[offset : offset + length]


def open_low_level(path_prefix: str) -> IndexedDataset:
    return IndexedDataset(path_prefix)
