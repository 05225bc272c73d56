"""Resumable pretraining sampler and data loader (Megatron's MegatronPretrainingSampler).

The global sample order is 0, 1, 2, ... of the dataset (the dataset itself is shuffled), so
it depends only on the data and the seed. Each step of `micro_batch_size * dp_size` samples
is cut into DP-rank slices: rank r gets samples [r * mbs, (r + 1) * mbs) of it. Resuming
from `consumed_samples` continues the exact same stream, in any DP layout.
"""

from __future__ import annotations

from typing import Iterator

import torch


class MegatronPretrainingSampler:
    """Yields lists of dataset indices: this DP rank's micro-batch of each global step."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size must be positive (got {micro_batch_size})")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0 (got {consumed_samples})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return max(0, self.total_samples - self.consumed_samples) // self.micro_batch_times_data_parallel_size

    def _my_slice(self, batch: list[int]) -> list[int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start : start + self.micro_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_times_data_parallel_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield self._my_slice(list(range(start, start + step)))
        remainder = (self.total_samples - self.consumed_samples) % step if self.total_samples > self.consumed_samples else 0
        if remainder and not self.drop_last:
            tail = list(range(self.total_samples - remainder, self.total_samples))
            mine = self._my_slice(tail)
            if mine:
                yield mine


def build_pretraining_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader | None:
    """A DataLoader yielding this DP rank's micro-batches as dicts of [micro_batch, seq] tensors.

    Returns None for a None dataset. Only the ranks that consume data (first and last pipeline
    stage, TP rank 0 before a broadcast) need to call this.
    """
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
