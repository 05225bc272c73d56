"""Distributed optimizer (ZeRO-1) bookkeeping: which flat slice of which parameter each DP rank owns.

Each DDP bucket of n (padded) elements is split into DP equal contiguous shards; DP rank r owns
[r * n/DP, (r+1) * n/DP). A parameter that straddles a shard boundary is owned in pieces by several
ranks. Gradients arrive in the shard by reduce-scatter (ddp.py), the optimizer steps only its slices,
and ddp.start_param_sync() all-gathers the updated parameters: per step the same bytes as one all-reduce.
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_lite import collectives
from megatron_lite.distributed.model_chunk import ModelChunk

# (model param, flat [start, end) this rank owns, {state key: that slice's tensor})
OwnedSlice = tuple[torch.nn.Parameter, int, int, Callable[[str], torch.Tensor]]


def shard_slices(chunk: ModelChunk) -> list[tuple[torch.nn.Parameter, int, int]]:
    """(param, start, end): the flat slices of this chunk's parameters that this DP rank owns."""
    slices = []
    for buffer in chunk.param_and_grad_buffers:
        for bucket in buffer.buckets:
            shard_start, shard_end = bucket.shard_range(buffer.dp_rank, buffer.dp_size)
            shard_start += bucket.offset
            shard_end += bucket.offset
            for param in bucket.params:
                param_start, param_end = buffer.param_index[id(param)]
                lo, hi = max(param_start, shard_start), min(param_end, shard_end)
                if lo < hi:
                    slices.append((param, lo - param_start, hi - param_start))
    return slices


def gather_parameter_state(model_chunks: list[ModelChunk], owned: list[OwnedSlice],
                           keys: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """All-gather every key's shards over DP, bucket by bucket, and cut out each parameter (full local shape).

    `owned` lists this rank's slices with a function giving each slice's tensor for a key. Every DP rank
    returns the full dict (simplest for checkpoint writers; the volume is one fp32 all-gather per key).
    Collective over DP: call on every rank.
    """
    by_param: dict[int, list[OwnedSlice]] = {}
    for entry in owned:
        by_param.setdefault(id(entry[0]), []).append(entry)
    result: dict[str, dict[str, torch.Tensor]] = {}
    for chunk in model_chunks:
        names = {id(p): n for n, p in chunk.module.named_parameters()}  # (no ZeRO-3 gather for names)
        for buffer in chunk.param_and_grad_buffers:
            device = buffer.device  # where the DP group communicates
            flats = {key: torch.zeros(buffer.numel, dtype=torch.float32, device=device) for key in keys}
            for param in buffer.params:
                param_start, _ = buffer.param_index[id(param)]
                for _, start, end, tensor_for in by_param.get(id(param), []):
                    for key in keys:
                        flats[key][param_start + start:param_start + end] = tensor_for(key).view(-1)
            for bucket in buffer.buckets:
                shard_start, shard_end = bucket.shard_range(buffer.dp_rank, buffer.dp_size)
                for key in keys:
                    region = flats[key][bucket.offset:bucket.offset + bucket.numel]
                    collectives.all_gather_into_tensor(region, region[shard_start:shard_end].clone(), group=buffer.dp_group)
            for param in buffer.params:
                param_start, param_end = buffer.param_index[id(param)]
                result[names[id(param)]] = {key: flats[key][param_start:param_end].view(param.shape).clone() for key in keys}
    return result
