"""Blending several datasets by weight (`--data-path 0.3 prefixA 0.7 prefixB`).

Sample i of the blend comes from the dataset whose count lags its target `weight * i` the
most (Megatron's greedy rule), so every prefix of the sample stream follows the weights to
within one sample per dataset.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch

from megatron_lite.data.gpt_dataset import cached_indices


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.size == 0 or np.any(array < 0) or array.sum() <= 0:
        raise ValueError(f"blend weights {list(weights)} must be non-negative with a positive sum")
    return array / array.sum()


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index), each [size]: which dataset sample i comes from
    and which sample of that dataset it is.

    Greedy: pick the dataset with the largest deficit `weight * max(i, 1) - count` (first one
    on ties), exactly Megatron's helpers.cpp rule. Sequential by nature; the loop is kept tight
    and the result is cached, so it costs about a second per million samples once.
    """
    w = normalize_weights(weights)
    k = len(w)
    dataset_index = np.empty(size, dtype=np.int16 if k < 2**15 else np.int32)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    if k == 1:
        dataset_index[:] = 0
        dataset_sample_index[:] = np.arange(size)
        return dataset_index, dataset_sample_index
    weights_list = w.tolist()
    counts = [0] * k
    ds_out = [0] * size
    sample_out = [0] * size
    order = range(k)
    for i in range(size):
        n = i if i > 0 else 1
        best, best_error = 0, weights_list[0] * n - counts[0]
        for d in order:
            error = weights_list[d] * n - counts[d]
            if error > best_error:
                best, best_error = d, error
        ds_out[i] = best
        sample_out[i] = counts[best]
        counts[best] += 1
    dataset_index[:] = ds_out
    dataset_sample_index[:] = sample_out
    return dataset_index, dataset_sample_index


def samples_needed_per_dataset(weights: Sequence[float], size: int) -> list[int]:
    """Samples each component must provide for a blend of `size` (greedy never exceeds
    ceil(weight * size) + 1; Megatron adds a 0.5% margin, we add the exact bound)."""
    return [int(np.ceil(w * size)) + 1 for w in normalize_weights(weights)]


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights`."""

    def __init__(
        self, datasets: Sequence[Any], weights: Sequence[float], size: int, cache_path: str | None = None, split_name: str = "train"
    ) -> None:
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        for d, (dataset, needed) in enumerate(zip(self.datasets, samples_needed_per_dataset(self.weights, self.size))):
            if len(dataset) < needed and self.weights[d] > 0:
                raise ValueError(f"blend component {d} has {len(dataset)} samples, the blend needs {needed}")
        description = {
            "class": "BlendedDataset",
            "split_name": split_name,
            "weights": self.weights.tolist(),
            "size": self.size,
            "datasets": [hashlib.md5(json.dumps(getattr(ds, "description", repr(ds)), sort_keys=True).encode()).hexdigest() for ds in self.datasets],
        }
        self.description = description
        self.dataset_index, self.dataset_sample_index = cached_indices(
            cache_path, description, ("dataset_index", "dataset_sample_index"), lambda: build_blending_indices(self.weights, self.size)
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
