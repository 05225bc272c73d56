"""Context parallelism: the sequence of every layer split over the CP group.

- `layout.py`: the load-balanced causal layout (2 x CP chunks, rank r holds chunks r and 2CP-1-r), the
  slicing of a micro-batch, and the ring's block plan (which query/key halves each step computes).
- `ring.py`: ring attention (`--cp-comm-type p2p`): K/V blocks travel around the CP ring with async
  send/recv overlapped with the current block, partial results merged by log-sum-exp.
- `attention.py`: the dispatcher used by the model, all-gather attention (`all_gather`) and Ulysses
  all-to-all attention (`a2a`).
- `loss.py`: the per-token loss averaged over all tokens of the sequence across CP.
"""
from megatron_lite.context_parallel.attention import context_parallel_attention
from megatron_lite.context_parallel.layout import (global_positions, local_indices, slice_batch_for_cp)
from megatron_lite.context_parallel.loss import cp_masked_mean

__all__ = ["context_parallel_attention", "global_positions", "local_indices", "slice_batch_for_cp", "cp_masked_mean"]
