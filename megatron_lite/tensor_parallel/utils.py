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
from dataclasses import dataclass
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


# The tile grid (part of the initialisation rule: changing these changes every model's initial values).
INIT_TILE_COLS = 256
INIT_TILE_ELEMENTS = 1 << 15
# Local rows are assembled at most this many values at a time (16 MiB of fp32): the bound on a rank's
# temporary memory during initialisation, besides one tile.
INIT_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class InitArgs:
    """What `initialize_param` needs besides the parameter: the name its values are drawn from (the tied
    output copy uses the embedding's), --seed, and its place in the group its ShardSpec splits it over."""
    name: str
    seed: int
    rank: int = 0
    size: int = 1


def tile_grid(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(rows, cols, tile_rows, tile_cols) of a canonical full tensor of `shape`, viewed as 2-D
    [shape[0], prod(shape[1:])] (a 1-D tensor is one column; a scalar, one value)."""
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    tile_cols = min(cols, INIT_TILE_COLS)
    return rows, cols, max(1, INIT_TILE_ELEMENTS // max(tile_cols, 1)), tile_cols


def draw_tile(name: str, seed: int, std: float, index: int, height: int, width: int) -> torch.Tensor:
    """Tile `index` (row-major in the grid) of parameter `name`: fp32 N(0, std) from its own CPU generator."""
    tile_seed = seed_for(seed, name if index == 0 else f"{name}#{index}")
    return torch.empty(height, width).normal_(0.0, std, generator=torch.Generator().manual_seed(tile_seed))


@torch.no_grad()
def initialize_param(param: torch.Tensor, name: str, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Fill `param` with this rank's shard of its canonical full tensor (see `initialize_param_range`)."""
    if param.dtype == torch.float32 and param.device.type == "cpu" and param.is_contiguous():
        initialize_param_range(param, param.data.view(-1), 0, param.numel(), InitArgs(name, seed, tp_rank, tp_size))
        return
    local = torch.empty(param.numel())
    initialize_param_range(param, local, 0, param.numel(), InitArgs(name, seed, tp_rank, tp_size))
    param.copy_(local.view(param.shape).to(dtype=param.dtype, device=param.device))


@torch.no_grad()
def initialize_param_range(param: torch.Tensor, out: torch.Tensor, start: int, end: int,
                           args: Optional[InitArgs] = None) -> None:
    """Write elements [start, end) of this rank's flattened shard of `param` into `out` (1-D, end - start
    values, any dtype and device). `param` gives only shape, ShardSpec and init_spec (set_init), so it may be
    on the meta device; `args` defaults to `param.init_args` (GPTModel.initialize records it).

    The rule (identical in every layout and in one process): the canonical full tensor, viewed as 2-D
    [shape[0], prod(shape[1:])], is cut into a fixed grid of tiles (`tile_grid`: up to INIT_TILE_COLS
    columns, INIT_TILE_ELEMENTS values each) that depends only on the full shape, and tile k (row-major) is
    `torch.empty(h, w).normal_(0, std, generator)` with the generator seeded by seed_for(seed, name) for
    k = 0 and seed_for(seed, f"{name}#{k}") otherwise (a tensor of one tile is thus one full-shape draw).
    A shard (TP rows or columns, SwiGLU's stride 2, vocabulary padding rows, which are zero) and any flat
    range of it (a ZeRO-3 DP shard) draws only the tiles it overlaps, so drawing time and memory divide by
    the number of ranks; memory is `out` plus INIT_BLOCK_ELEMENTS values and one row of tiles (e.g. 128 x
    8192 values for a [2048, 8192] weight)."""
    args = args if args is not None else getattr(param, "init_args", None)
    if args is None:
        raise ValueError("initialize_param_range: the parameter has no init_args (name, seed and rank to draw from): "
                         "build the model with GPTModel, which records them, or initialise it on a real device")
    kind, std = getattr(param, "init_spec", ("normal", 0.02))
    if kind not in ("zeros", "ones", "normal"):
        raise ValueError(f"unknown init kind {kind!r} for {args.name}")
    if not 0 <= start <= end <= param.numel() or out.numel() != end - start:
        raise ValueError(f"initialize_param_range: [{start}, {end}) of {args.name} ({param.numel()} values) "
                         f"into {out.numel()} values")
    if end == start:
        return
    spec, local_shape = shard_spec_of(param), tuple(param.shape)
    shape = spec.full_shape(local_shape, args.size)
    rows, cols, tile_rows, tile_cols = tile_grid(shape)
    row_len = math.prod(local_shape[1:]) if len(local_shape) > 1 else 1
    row_ids, col_ids = _local_to_full(spec, shape, local_shape, args.rank, args.size)
    tiles_per_row = -(-cols // tile_cols)
    # The current tile row's tiles: consecutive row blocks, and the runs of a stride-2 or padded shard,
    # may need the same tile again.
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def tile(ti: int, tj: int) -> torch.Tensor:
        if (ti, tj) not in cache:
            if cache and next(iter(cache))[0] != ti:
                cache.clear()
            height, width = min(tile_rows, rows - ti * tile_rows), min(tile_cols, cols - tj * tile_cols)
            cache[(ti, tj)] = (draw_tile(args.name, args.seed, std, ti * tiles_per_row + tj, height, width)
                               if kind == "normal" else torch.full((height, width), float(kind == "ones")))
        return cache[(ti, tj)]

    direct = out.dtype == torch.float32 and out.device.type == "cpu"
    step = max(1, INIT_BLOCK_ELEMENTS // row_len)
    first, last = start // row_len, -(-end // row_len)
    for r0 in range(first, last, step):
        r1 = min(last, r0 + step)
        lo, hi = max(start, r0 * row_len), min(end, r1 * row_len)
        whole = lo == r0 * row_len and hi == r1 * row_len
        block = (out[lo - start:hi - start] if whole and direct else torch.empty((r1 - r0) * row_len)).view(r1 - r0, -1)
        rows_here = torch.arange(r0, r1) if row_ids is None else row_ids[r0:r1]
        _fill_block(block, rows_here, col_ids, cols, tile_rows, tile_cols, tile)
        if not (whole and direct):
            out[lo - start:hi - start].copy_(block.view(-1)[lo - r0 * row_len:hi - r0 * row_len])


def _local_to_full(spec: ShardSpec, shape: tuple[int, ...], local_shape: tuple[int, ...], rank: int,
                   size: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Where a shard's rows and columns (in the 2-D view) lie in the full tensor: (full row of each local
    row, -1 for vocabulary padding; full column of each local column), None where they are the same."""
    if not spec.is_sharded or len(shape) == 0:
        return None, None
    ones = (1,) * (len(shape) - 1)
    if spec.partition_dim == 0:  # 1-based so that the zero padding reads -1
        ids = torch.arange(1, shape[0] + 1).view(shape[0], *ones)
        return spec.shard(ids, rank, size, (local_shape[0], *ones)).reshape(-1) - 1, None
    ids = torch.arange(math.prod(shape[1:])).view(1, *shape[1:])
    return None, spec.shard(ids, rank, size, (1, *local_shape[1:])).reshape(-1)


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(position, first id, length) of each run of consecutive ids (ids < 0 are skipped)."""
    if ids.numel() == 0:
        return []
    starts = torch.ones(ids.numel(), dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1] + 1
    bounds = torch.nonzero(starts).view(-1).tolist() + [ids.numel()]
    first = ids[bounds[:-1]].tolist()
    return [(a, f, b - a) for a, b, f in zip(bounds, bounds[1:], first) if f >= 0]


def _fill_block(block: torch.Tensor, row_ids: torch.Tensor, col_ids: Optional[torch.Tensor], cols: int,
                tile_rows: int, tile_cols: int, tile) -> None:
    """block[i, j] = full[row_ids[i], col_ids[j]] (0 where row_ids[i] < 0), read tile by tile."""
    if bool((row_ids < 0).any()):
        block.zero_()
    col_runs = [(0, 0, cols)] if col_ids is None else _runs(col_ids)
    for at_row, full_row, n_rows in _runs(row_ids):
        for ti in range(full_row // tile_rows, (full_row + n_rows - 1) // tile_rows + 1):
            r_lo, r_hi = max(full_row, ti * tile_rows), min(full_row + n_rows, (ti + 1) * tile_rows)
            for at_col, full_col, n_cols in col_runs:
                for tj in range(full_col // tile_cols, (full_col + n_cols - 1) // tile_cols + 1):
                    c_lo, c_hi = max(full_col, tj * tile_cols), min(full_col + n_cols, (tj + 1) * tile_cols)
                    block[at_row + r_lo - full_row:at_row + r_hi - full_row,
                          at_col + c_lo - full_col:at_col + c_hi - full_col] = \
                        tile(ti, tj)[r_lo - ti * tile_rows:r_hi - ti * tile_rows, c_lo - tj * tile_cols:c_hi - tj * tile_cols]


def describe(param: torch.Tensor) -> dict[str, Any]:
    """Every metadata attribute of a parameter (for logging and debugging)."""
    return {**shard_spec_of(param).to_json(), "local_shape": tuple(param.shape),
            "sequence_parallel": getattr(param, "sequence_parallel", False),
            "shared_embedding": getattr(param, "shared_embedding", False)}
