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
import math
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


# Values are drawn this many at a time (16 MiB of fp32): a rank never holds a full tensor it does not own.
INIT_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def initialize_param(param: torch.Tensor, name: str, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Fill `param` with this TP rank's shard of its canonical full tensor, drawn in fp32 from a CPU
    generator seeded by (seed, name) (identical on any device and in any layout).

    The full tensor is never materialised: it is drawn in chunks of whole rows (dim 0) from the same
    generator stream, and only this rank's part of each chunk is kept, so memory is the shard plus one
    chunk. The values equal one `torch.empty(full).normal_()` draw bit for bit: torch's CPU normal fills
    uniforms for the whole tensor, then transforms each aligned block of 16 (and redraws the last 16 when
    the size is not a multiple of 16); chunks that are multiples of 16 elements, with a last chunk of at
    least 16, consume the stream in the same order (tests/unit/test_init_chunked.py checks it). Drawing
    stops after the last row this rank needs."""
    kind, std = getattr(param, "init_spec", ("normal", 0.02))
    if kind not in ("zeros", "ones", "normal"):
        raise ValueError(f"unknown init kind {kind!r} for {name}")
    shape = full_shape(param, tp_size)
    numel = math.prod(shape)
    if kind != "normal" or numel <= INIT_CHUNK_ELEMENTS or len(shape) == 0:
        full = (torch.zeros(shape) if kind == "zeros" else torch.ones(shape) if kind == "ones" else
                torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed_for(seed, name))))
        param.copy_(shard_of_full(full, param, tp_rank, tp_size).to(dtype=param.dtype, device=param.device))
        return
    generator = torch.Generator().manual_seed(seed_for(seed, name))
    # An fp32 host parameter is filled in place; otherwise an fp32 host shard is converted at the end.
    in_place = param.dtype == torch.float32 and param.device.type == "cpu"
    local = param.data.zero_() if in_place else torch.zeros(param.shape)  # vocabulary padding rows stay zero
    for r0, r1 in _row_chunks(shape):
        chunk = torch.empty((r1 - r0, *shape[1:])).normal_(0.0, std, generator=generator)
        if not _keep_rows(chunk, r0, local, param, tp_rank, tp_size):
            break
    if not in_place:
        param.copy_(local.to(dtype=param.dtype, device=param.device))


def _row_chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """[r0, r1) row ranges of about INIT_CHUNK_ELEMENTS elements, each a multiple of 16 elements except
    the last, which holds at least 16 (so the chunked draw equals the one-tensor draw)."""
    rows, row_len = shape[0], math.prod(shape[1:])
    step = 16 // math.gcd(16, row_len)  # rows per chunk must be a multiple of this
    per_chunk = max(step, (INIT_CHUNK_ELEMENTS // max(row_len, 1)) // step * step)
    bounds = list(range(0, rows, per_chunk)) + [rows]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * row_len < 16:
        del bounds[-2]  # a tail under 16 values would be drawn by torch's scalar path: join it to the previous chunk
    return list(zip(bounds, bounds[1:]))


def _keep_rows(chunk: torch.Tensor, r0: int, local: torch.Tensor, param: torch.Tensor, tp_rank: int,
               tp_size: int) -> bool:
    """Copy this rank's part of full rows [r0, r0 + len(chunk)) into `local`; False once no later row is needed."""
    spec = shard_spec_of(param)
    r1 = r0 + chunk.shape[0]
    if not spec.is_sharded:
        local[r0:r1] = chunk
        return True
    if spec.partition_dim != 0:  # every row contributes its own columns: cut the chunk like the full tensor
        local[r0:r1] = spec.shard(chunk, tp_rank, tp_size, (chunk.shape[0], *param.shape[1:]))
        return True
    # Split along rows: which full row each local row holds (1-based; 0 = vocabulary padding).
    ids = spec.shard(torch.arange(1, full_shape(param, tp_size)[0] + 1).unsqueeze(1), tp_rank, tp_size,
                     (param.shape[0], 1)).squeeze(1)
    wanted = ((ids > r0) & (ids <= r1)).nonzero().squeeze(1)
    local[wanted] = chunk[ids[wanted] - 1 - r0]
    return bool((ids > r1).any())


def describe(param: torch.Tensor) -> dict[str, Any]:
    """Every metadata attribute of a parameter (for logging and debugging)."""
    return {**shard_spec_of(param).to_json(), "local_shape": tuple(param.shape),
            "sequence_parallel": getattr(param, "sequence_parallel", False),
            "shared_embedding": getattr(param, "shared_embedding", False)}
