"""Parameter metadata, sharding of canonical full tensors, and layout-invariant initialisation.

A parameter's *canonical full tensor* is what the single-process model holds: unpadded for
vocabulary-parallel tensors. Its ShardSpec (`shard_spec.py`, attached by the layer that made it) says how
the local shard is cut from it; `shard_of_full` and `full_from_shards` apply that rule to a parameter.
Besides the ShardSpec, two attributes give a parameter's gradient-sync role (docs/internals.md):
`sequence_parallel` (replicated over TP but fed part of the sequence) and `shared_embedding` (the tied
word embedding and its last-stage copy).
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Union

import torch

from megatron_lite import collectives
from megatron_lite.process_groups import Group
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec, shard_spec_of

SpecSource = Union[torch.Tensor, tuple]  # a parameter, or (ShardSpec, local shape)


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: the vocabulary rounded up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def set_default_attributes(param: torch.Tensor) -> None:
    """Give every parameter its ShardSpec and grad-sync attributes, so consumers never need getattr defaults."""
    if not hasattr(param, "shard_spec"):
        set_shard_spec(param, ShardSpec())
    for name in ("sequence_parallel", "shared_embedding"):
        if not hasattr(param, name):
            setattr(param, name, False)


def _spec_and_shape(source: SpecSource) -> tuple[ShardSpec, tuple[int, ...]]:
    if isinstance(source, tuple):
        spec, local_shape = source
        return spec, tuple(local_shape)
    return shard_spec_of(source), tuple(source.shape)


def full_shape(source: SpecSource, tp_size: int) -> tuple[int, ...]:
    """Shape of the canonical (unpadded) full tensor of a parameter (or of (ShardSpec, local shape))."""
    spec, local_shape = _spec_and_shape(source)
    return spec.full_shape(local_shape, tp_size)


def shard_of_full(full: torch.Tensor, source: SpecSource, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of the canonical full tensor (padding vocabulary rows with zeros)."""
    spec, local_shape = _spec_and_shape(source)
    return spec.shard(full, tp_rank, tp_size, local_shape)


def full_from_shards(shards: list[torch.Tensor], source: Union[SpecSource, ShardSpec]) -> torch.Tensor:
    """The canonical full tensor from every TP rank's shard (rank order); inverse of shard_of_full."""
    spec = source if isinstance(source, ShardSpec) else _spec_and_shape(source)[0]
    return spec.unshard(shards)


def gather_full_param(param: torch.Tensor, tensor: Optional[torch.Tensor] = None, *, group: Group) -> torch.Tensor:
    """All-gather `tensor` (default: the param's data; pass param.grad for its gradient) over the TP group
    `group` and return the canonical full tensor on every TP rank."""
    data = (param.detach() if tensor is None else tensor.detach())
    spec = shard_spec_of(param)
    if not spec.is_sharded:
        return data
    if group.size == 1:
        return spec.unshard([data])
    gathered = collectives.all_gather(data.contiguous(), group, dim=0)
    return spec.unshard(list(torch.chunk(gathered, group.size, dim=0)))


# ---- layout-invariant initialisation -------------------------------------------------------------
def seed_for(seed: int, name: str) -> int:
    """A 63-bit seed from (--seed, global parameter name), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def set_init(param: torch.Tensor, kind: str, std: float = 0.0) -> None:
    """Record how `param`'s full tensor is drawn: kind 'normal' (mean 0, std), 'zeros' or 'ones'."""
    param.init_spec = (kind, std)


@torch.no_grad()
def initialize_param(param: torch.Tensor, name: str, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Draw the canonical full tensor of `param` from a CPU generator seeded by (seed, name), in fp32,
    and copy this TP rank's shard into it. The CPU generator makes the draw identical on any device."""
    kind, std = getattr(param, "init_spec", ("normal", 0.02))
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
    shard = shard_of_full(full, param, tp_rank, tp_size)
    param.copy_(shard.to(dtype=param.dtype, device=param.device))


def describe(param: torch.Tensor) -> dict[str, Any]:
    """Every metadata attribute of a parameter (for logging and debugging)."""
    return {**shard_spec_of(param).to_json(), "local_shape": tuple(param.shape),
            "sequence_parallel": getattr(param, "sequence_parallel", False),
            "shared_embedding": getattr(param, "shared_embedding", False)}
