"""Parameter metadata, sharding of canonical full tensors, and layout-invariant initialisation.

A parameter's *canonical full tensor* is what the single-process model holds: unpadded for
vocabulary-parallel tensors. `shard_of_full` and `full_from_shards` convert between it and the
TP shards, honouring the attributes of docs/internals.md (tensor_model_parallel, partition_dim,
partition_stride, unpadded_size). Checkpoints, converters and tests use only these.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Union

import torch

from megatron_lite import collectives, parallel_state

Meta = Union[torch.Tensor, dict]


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: the vocabulary rounded up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, partition_dim: int = 0,
                                         stride: int = 1, unpadded_size: Optional[int] = None) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim
    param.partition_stride = stride
    param.unpadded_size = unpadded_size


def set_default_attributes(param: torch.Tensor) -> None:
    """Give every parameter the full set of attributes, so consumers never need getattr defaults."""
    for name, default in (("tensor_model_parallel", False), ("partition_dim", -1), ("partition_stride", 1),
                          ("unpadded_size", None), ("sequence_parallel", False), ("shared_embedding", False)):
        if not hasattr(param, name):
            setattr(param, name, default)


def param_meta(param: torch.Tensor) -> dict:
    """The attributes that describe how `param` is sharded, plus its local shape (a plain dict, for checkpoints)."""
    return {"tensor_model_parallel": bool(getattr(param, "tensor_model_parallel", False)),
            "partition_dim": int(getattr(param, "partition_dim", -1)),
            "partition_stride": int(getattr(param, "partition_stride", 1)),
            "unpadded_size": getattr(param, "unpadded_size", None),
            "local_shape": tuple(param.shape)}


def _meta(param_or_meta: Meta) -> dict:
    return param_or_meta if isinstance(param_or_meta, dict) else param_meta(param_or_meta)


def full_shape(param_or_meta: Meta, tp_size: int) -> tuple[int, ...]:
    """Shape of the canonical (unpadded) full tensor."""
    meta = _meta(param_or_meta)
    shape = list(meta["local_shape"])
    if meta["tensor_model_parallel"]:
        dim = meta["partition_dim"]
        shape[dim] = meta["unpadded_size"] if meta["unpadded_size"] is not None else shape[dim] * tp_size
    return tuple(shape)


def shard_of_full(full: torch.Tensor, param_or_meta: Meta, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of the canonical full tensor (padding vocabulary rows with zeros)."""
    meta = _meta(param_or_meta)
    if not meta["tensor_model_parallel"]:
        return full
    dim, stride = meta["partition_dim"], meta["partition_stride"]
    if meta["unpadded_size"] is not None:
        padded = meta["local_shape"][dim] * tp_size
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    pieces = torch.chunk(full, stride, dim=dim)
    return torch.cat([torch.chunk(piece, tp_size, dim=dim)[tp_rank] for piece in pieces], dim=dim).contiguous()


def full_from_shards(shards: list[torch.Tensor], param_or_meta: Meta) -> torch.Tensor:
    """The canonical full tensor from every TP rank's shard (rank order); inverse of shard_of_full."""
    meta = _meta(param_or_meta)
    if not meta["tensor_model_parallel"]:
        return shards[0]
    dim, stride = meta["partition_dim"], meta["partition_stride"]
    per_rank = [torch.chunk(shard, stride, dim=dim) for shard in shards]
    full = torch.cat([torch.cat([pieces[i] for pieces in per_rank], dim=dim) for i in range(stride)], dim=dim)
    if meta["unpadded_size"] is not None:
        full = full.narrow(dim, 0, meta["unpadded_size"])
    return full.contiguous()


def gather_full_param(param: torch.Tensor, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All-gather `tensor` (default: the param's data; pass param.grad for its gradient) over TP and
    return the canonical full tensor on every TP rank."""
    data = (param.detach() if tensor is None else tensor.detach())
    meta = param_meta(param)
    if not meta["tensor_model_parallel"]:
        return data
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1:
        return full_from_shards([data], meta)
    gathered = collectives.all_gather(data.contiguous(), parallel_state.get_tensor_model_parallel_group(), dim=0)
    return full_from_shards(list(torch.chunk(gathered, tp_size, dim=0)), meta)


# ---- layout-invariant initialisation -------------------------------------------------------------
def seed_for(seed: int, name: str) -> int:
    """A 63-bit seed from (--seed, global parameter name), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def set_init(param: torch.Tensor, kind: str, std: float = 0.0) -> None:
    """Record how `param`'s full tensor is drawn: kind 'normal' (mean 0, std), 'zeros' or 'ones'."""
    param.init_spec = (kind, std)


@torch.no_grad()
def initialize_param(param: torch.Tensor, name: str, seed: int) -> None:
    """Draw the canonical full tensor of `param` from a CPU generator seeded by (seed, name), in fp32,
    and copy this TP rank's shard into it. The CPU generator makes the draw identical on any device."""
    kind, std = getattr(param, "init_spec", ("normal", 0.02))
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shape = full_shape(param, tp_size)
    if kind == "zeros":
        full = torch.zeros(shape)
    elif kind == "ones":
        full = torch.ones(shape)
    elif kind == "normal":
        generator = torch.Generator().manual_seed(seed_for(seed, name))
        full = torch.empty(shape).normal_(0.0, std, generator=generator)
    else:
        raise ValueError(f"unknown init kind {kind!r} for {name}")
    shard = shard_of_full(full, param, parallel_state.get_tensor_model_parallel_rank(), tp_size)
    param.copy_(shard.to(dtype=param.dtype, device=param.device))


def describe(param: torch.Tensor) -> dict[str, Any]:
    """Every metadata attribute of a parameter (for logging and debugging)."""
    return {**param_meta(param), "sequence_parallel": getattr(param, "sequence_parallel", False),
            "shared_embedding": getattr(param, "shared_embedding", False)}
