"""One rank's slice of a saved parameter, in any layout, read from only the saved pieces that overlap it.

A checkpoint stores each parameter as shards along its ShardSpec's axis (TP, expert TP), each shard as
flat pieces [start, end) written by the ranks that held them (checkpoint_writer.py). A loading rank needs
a flat range [start, end) of its own shard in its own layout: the whole shard, a distributed-optimizer
slice, or a ZeRO-3 slice. When the saved shard is exactly its shard (same group size and local shape) or
the parameter is replicated, that is the same flat range of one saved shard. Otherwise (resharding) each
local row along the partition dimension is one canonical row (ShardSpec's stride blocks and vocabulary
padding included), so the needed rows split into runs that each lie in one saved shard; a run is the box
[outer, rows, inner] of that shard, copied from just the pieces overlapping it. Memory is the requested
slice (rounded out to whole rows, or to whole outer rows when the split dimension is not the first);
nothing else of the parameter is built, and no other shard is read. `files_for_slice` lists the files
the same plan reads, so a load verifies exactly those before reading any. (A model that cuts the
parameter differently from the checkpoint, e.g. another stride or axis, gets it the general way: the
canonical tensor rebuilt from every shard, then cut by its own ShardSpec.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_lite.checkpoint_io import CheckpointError, CheckpointReader
from megatron_lite.tensor_parallel.shard_spec import ShardSpec


@dataclass(frozen=True)
class Target:
    """Where the loading rank's shard sits: its index in the group the parameter is split over, the group's
    size, its local shape (vocabulary rows padded as in its layout) and how it cuts the parameter (None:
    as the checkpoint does)."""
    index: int
    size: int
    shape: tuple[int, ...]
    spec: Optional[ShardSpec] = None


@dataclass(frozen=True)
class _Run:
    """Rows [row, row + count) of saved shard `index` fill box rows [box_row, box_row + count)."""
    index: int
    row: int
    count: int
    box_row: int


@dataclass
class _Plan:
    direct: Optional[int] = None  # read flat [start, end) of this saved shard as it is
    rebuild: bool = False  # the target cuts it differently: rebuild the canonical tensor, cut, slice
    box_start: int = 0  # flat index, in the target shard, of the box's first element
    outer: tuple[int, int] = (0, 1)  # the box's outer range [lo, hi)
    rows: int = 0  # the box's rows
    inner: int = 1
    saved_rows: int = 0  # rows of a saved shard along the partition dimension
    runs: tuple[_Run, ...] = ()


def _plan(reader: CheckpointReader, name: str, target: Target, start: int, end: int) -> _Plan:
    meta = reader.params[name]
    spec = meta.shard
    if target.spec is not None and target.spec != spec:
        return _Plan(rebuild=True)
    if not spec.is_sharded:
        return _Plan(direct=0)
    if meta.num_shards == target.size and list(reader.shard_shape(name, target.index)) == list(target.shape):
        return _Plan(direct=target.index)
    dim, shape, saved = spec.partition_dim, list(target.shape), reader.shard_shape(name, 0)
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    if math.prod(saved[:dim]) != outer or math.prod(saved[dim + 1:]) != inner:
        raise CheckpointError(f"{reader.path}: {name}: saved shard shape {saved} does not fit local shape {shape} "
                              f"outside dimension {dim}; the model flags differ from the checkpoint's.")
    rows = shape[dim]
    if outer == 1:  # split along the first dimension: the slice is a range of whole rows
        first, last, outer_range = start // inner, -(-end // inner), (0, 1)
    else:  # a range of whole outer rows, every local row of each
        per_outer = rows * inner
        first, last, outer_range = 0, rows, (start // per_outer, -(-end // per_outer))
    runs = _row_runs(meta.shape[dim], spec.stride, target, rows, meta.num_shards, saved[dim], first, last)
    return _Plan(box_start=outer_range[0] * rows * inner + first * inner, outer=outer_range, rows=last - first,
                 inner=inner, saved_rows=saved[dim], runs=tuple(runs))


def _row_runs(real_rows: int, stride: int, target: Target, rows: int, saved_size: int, saved_rows: int,
              first: int, last: int) -> list[_Run]:
    """Target rows [first, last) as runs of consecutive rows of one saved shard. A local row r is row
    `off` of stride block `block` (ShardSpec.shard's cut); canonical rows past `real_rows` are vocabulary
    padding, left zero."""
    block_rows, saved_block_rows = rows // stride, saved_rows // stride
    runs, row = [], first
    while row < last:
        block, off = divmod(row, block_rows)
        count = min(block_rows - off, last - row)
        canonical = block * target.size * block_rows + target.index * block_rows + off
        if canonical < real_rows:
            count = min(count, real_rows - canonical)
            saved_block, within = divmod(canonical, saved_size * saved_block_rows)
            index, saved_off = divmod(within, saved_block_rows)
            count = min(count, saved_block_rows - saved_off)
            runs.append(_Run(index, saved_block * saved_block_rows + saved_off, count, row - first))
        row += count
    return runs


def _run_span(plan: _Plan, run: _Run) -> tuple[int, int]:
    """The flat range of the saved shard that holds a run's box (its first to its last element)."""
    per_outer = plan.saved_rows * plan.inner
    lo, hi = plan.outer
    return lo * per_outer + run.row * plan.inner, (hi - 1) * per_outer + (run.row + run.count) * plan.inner


def files_for_slice(reader: CheckpointReader, name: str, target: Target, start: int, end: int,
                    kind: str = "model") -> set[str]:
    """The files `read_slice` opens for the same arguments."""
    plan = _plan(reader, name, target, start, end)
    if plan.rebuild:
        return set(reader.params[name].shard_files(kind))
    if plan.direct is not None:
        return {f for f, _, _ in reader.overlapping_pieces(name, plan.direct, kind, start, end)}
    return {f for run in plan.runs for f, _, _ in reader.overlapping_pieces(name, run.index, kind, *_run_span(plan, run))}


def read_slice(reader: CheckpointReader, name: str, target: Target, start: int, end: int, kind: str = "model",
               key: Optional[str] = None) -> torch.Tensor:
    """Flat [start, end) of this rank's local shard of saved parameter `name` (kind "optim": of optimizer
    state `key`), in the saved dtype."""
    plan = _plan(reader, name, target, start, end)
    if plan.rebuild:
        full = reader.full_tensor(name, kind, key)
        return target.spec.shard(full, target.index, target.size, target.shape).reshape(-1)[start:end]
    if plan.direct is not None:
        return reader.shard_slice(name, plan.direct, start, end, kind, key)
    box: Optional[torch.Tensor] = None
    for run in plan.runs:
        for filename, piece_start, piece_end in reader.overlapping_pieces(name, run.index, kind, *_run_span(plan, run)):
            flat = reader.piece(name, run.index, filename, piece_start, piece_end, key)
            if box is None:
                box = torch.zeros(plan.outer[1] - plan.outer[0], plan.rows, plan.inner, dtype=flat.dtype)
            for copied in _copy_piece(flat, piece_start, piece_end, plan, run, box[:, run.box_row:run.box_row + run.count]):
                reader.note_read(filename, copied)
    if box is None:  # only vocabulary padding
        dtype = reader.params[name].torch_dtype if kind == "model" else torch.float32
        box = torch.zeros(plan.outer[1] - plan.outer[0], plan.rows, plan.inner, dtype=dtype)
    return box.view(-1)[start - plan.box_start:end - plan.box_start]


def _copy_piece(flat: torch.Tensor, piece_start: int, piece_end: int, plan: _Plan, run: _Run,
                out: torch.Tensor) -> list[torch.Tensor]:
    """Copy the part of one saved piece (flat [piece_start, piece_end) of its shard) inside the run's box
    into `out` ([outer, count, inner] of the box); returns the source tensors copied. The outer rows the
    piece covers whole are one strided copy; at most two partial ones are copied row by row."""
    per_outer, inner, lo = plan.saved_rows * plan.inner, plan.inner, plan.outer[0]
    first, last = max(plan.outer[0], piece_start // per_outer), min(plan.outer[1], -(-piece_end // per_outer))
    whole_lo, whole_hi = max(first, -(-piece_start // per_outer)), min(last, piece_end // per_outer)
    copied = []
    if whole_lo < whole_hi:
        source = flat[whole_lo * per_outer - piece_start:whole_hi * per_outer - piece_start]
        source = source.view(whole_hi - whole_lo, plan.saved_rows, inner)[:, run.row:run.row + run.count]
        out[whole_lo - lo:whole_hi - lo].copy_(source)
        copied.append(source)
    for outer_row in sorted({first, last - 1}):
        if not first <= outer_row < last or whole_lo <= outer_row < whole_hi:
            continue
        base = outer_row * per_outer + run.row * inner
        a, b = max(piece_start, base), min(piece_end, base + run.count * inner)
        if a < b:
            out[outer_row - lo].view(-1)[a - base:b - base].copy_(flat[a - piece_start:b - piece_start])
            copied.append(flat[a - piece_start:b - piece_start])
    return copied
