"""Distributed optimizer (ZeRO-1) bookkeeping: which flat slice of which parameter each DP rank owns.

Each DDP bucket of n (padded) elements is split into DP equal contiguous shards; DP rank r owns
[r * n/DP, (r+1) * n/DP). A parameter that straddles a shard boundary is owned in pieces by several
ranks. Gradients arrive in the shard by reduce-scatter (ddp.py), the optimizer steps only its slices,
and ddp.start_param_sync() all-gathers the updated parameters: per step the same bytes as one all-reduce.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_lite import collectives

if TYPE_CHECKING:
    from megatron_lite.optimizer.optimizer import MegatronOptimizer


def shard_slices(ddp_chunk: nn.Module) -> list[tuple[nn.Parameter, int, int]]:
    """(param, start, end): the flat slices of this chunk's parameters that this DP rank owns."""
    slices = []
    for buffer in ddp_chunk.param_and_grad_buffers:
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


def gather_parameter_state(optimizer: "MegatronOptimizer", keys: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """All-gather every key's shards over DP, bucket by bucket, and cut out each parameter (full local shape).

    Every DP rank returns the full dict (simplest for checkpoint writers; the volume is one fp32
    all-gather per key). Collective over DP: call on every rank.
    """
    by_param = {id(m.model_param): [] for m in optimizer.main_params}
    for m in optimizer.main_params:
        by_param[id(m.model_param)].append(m)
    result: dict[str, dict[str, torch.Tensor]] = {}
    for chunk in optimizer.model_chunks:
        names = {id(p): n for n, p in chunk.named_parameters()}
        for buffer in chunk.param_and_grad_buffers:
            flats = {key: torch.zeros(buffer.numel, dtype=torch.float32) for key in keys}
            for param in buffer.params:
                param_start, _ = buffer.param_index[id(param)]
                for m in by_param.get(id(param), []):
                    for key in keys:
                        flats[key][param_start + m.start:param_start + m.end] = optimizer._tensor_for(m, key).view(-1)
            for bucket in buffer.buckets:
                shard_start, shard_end = bucket.shard_range(buffer.dp_rank, buffer.dp_size)
                for key in keys:
                    region = flats[key][bucket.offset:bucket.offset + bucket.numel]
                    collectives.all_gather_into_tensor(region, region[shard_start:shard_end].clone(), group=buffer.dp_group)
            for param in buffer.params:
                param_start, param_end = buffer.param_index[id(param)]
                result[names[id(param)]] = {key: flats[key][param_start:param_end].view(param.shape).clone() for key in keys}
    return result
