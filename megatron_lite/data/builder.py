"""`build_gpt_datasets`: the one entry point training uses to get train/valid/test data."""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from megatron_lite.data.blended_dataset import BlendedDataset, samples_needed_per_dataset
from megatron_lite.data.gpt_dataset import GPTDataset, MockLowLevelDataset, get_split_indices, parse_split
from megatron_lite.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """`['0.3', 'A', '0.7', 'B']` -> (['A', 'B'], [0.3, 0.7]); `['A']` -> (['A'], None).

    Several prefixes without weights -> weights None (the caller weights them by size).
    """
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path is empty; give a prefix, or weight/prefix pairs, or use --mock-data")

    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if not any(is_number(x) for x in items):
        return items, None
    if len(items) % 2 or not all(is_number(w) for w in items[0::2]):
        raise ValueError(
            f"--data-path {' '.join(items)}: expected 'prefix' or 'weight prefix weight prefix ...', "
            "e.g. --data-path 0.3 data/a_text_document 0.7 data/b_text_document"
        )
    return items[1::2], [float(w) for w in items[0::2]]


def data_fingerprint(data_path: list[str] | None, split: str, mock: bool) -> dict:
    """What a checkpoint records about its training data, so that resuming on other data (a dataset
    grown, shrunk or regenerated, another blend or split) is an error before training. Opening each
    dataset also checks its .bin/.idx pair (truncation, mismatch), naming the file. Directories are not
    recorded: moving the data elsewhere is not a change."""
    fingerprint: dict = {"split": split, "mock_data": bool(mock)}
    if mock or not data_path:
        return fingerprint
    prefixes, weights = parse_data_path(data_path)
    fingerprint["blend weights"] = weights
    for i, prefix in enumerate(prefixes):
        dataset = IndexedDataset(prefix)
        fingerprint[f"dataset {i} ({prefix})"] = {
            "name": os.path.basename(prefix), "sequences": len(dataset),
            "documents": len(dataset.document_indices) - 1, "tokens": int(dataset.num_tokens)}
    return fingerprint


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """One line per entry that differs; datasets are matched by position in --data-path, not by directory."""
    def strip(key: str) -> str:
        return key.split(" (")[0]
    saved_by, current_by = {strip(k): (k, v) for k, v in saved.items()}, {strip(k): (k, v) for k, v in current.items()}
    lines = []
    for key in sorted(set(saved_by) | set(current_by)):
        (_, old), (name, new) = saved_by.get(key, (key, None)), current_by.get(key, (key, None))
        if old != new:
            lines.append(f"{name}: {old} (checkpoint) vs {new} (now)")
    return lines


def build_gpt_datasets(
    data_path: list[str] | None,
    split: str,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    cache_path: str | None,
    mock: bool,
    vocab_size: int | None,
    eod_id: int,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> tuple[object | None, object | None, object | None]:
    """(train, valid, test) datasets; a split is None when its --split share or its requested
    sample count is zero, or when it gets no documents."""
    fractions = parse_split(split)
    options = dict(
        seq_length=seq_length,
        seed=seed,
        eod_id=eod_id,
        cache_path=cache_path,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
    )
    if mock:
        low_levels = [MockLowLevelDataset(vocab_size, eod_id, seed, mean_length=max(seq_length, 8))]
        weights = None
    else:
        if not data_path:
            raise ValueError("no data: give --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
        prefixes, weights = parse_data_path(data_path)
        low_levels = [IndexedDataset(p) for p in prefixes]
        if weights is None and len(prefixes) > 1:
            # Unweighted list: weight by size, which behaves like concatenating the corpora.
            weights = [float(ds.num_tokens) for ds in low_levels]
    results: list[object | None] = []
    for split_id, name in enumerate(SPLIT_NAMES):
        wanted = int(num_samples[split_id]) if num_samples[split_id] is not None else 0
        if fractions[split_id] == 0 or wanted <= 0:
            results.append(None)
            continue
        per_dataset = [wanted] if len(low_levels) == 1 else samples_needed_per_dataset(weights, wanted)
        components = []
        for low_level, count in zip(low_levels, per_dataset):
            bounds = get_split_indices(split, len(low_level))
            documents = np.arange(bounds[split_id], bounds[split_id + 1], dtype=np.int64)
            if len(documents) == 0:
                components = None
                break
            components.append(GPTDataset(low_level, documents, num_samples=count, split_name=name, **options))
        if components is None:
            where = getattr(low_level, "path_prefix", "mock data")
            print(f"warning: the {name} split of {where} has no documents with --split {split}; {name} data is None", file=sys.stderr)
            results.append(None)
        elif len(components) == 1:
            results.append(components[0])
        else:
            results.append(BlendedDataset(components, weights, wanted, cache_path=cache_path, split_name=name))
    return tuple(results)
