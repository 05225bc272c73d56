"""Layout-invariant initialisation drawn in tiles (issue 19 item 7; the rule is in
`tensor_parallel.utils.initialize_param_range`'s docstring). The reference full tensor is rebuilt here
tile by tile from the stated rule; for every ShardSpec the model uses (replicated, row- and column-split,
SwiGLU's stride 2, the padded vocabulary), awkward sizes (not multiples of the tile, one-element rows,
3-D) and several tile grids, every TP rank's shard, and any flat range of it (a ZeRO-3 DP shard), equals
the shard of that full tensor bit for bit; a rank draws only the tiles its values lie in."""
import math

import pytest
import torch

from megatron_lite.tensor_parallel import utils
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec
from megatron_lite.tensor_parallel.utils import (InitArgs, initialize_param, initialize_param_range, pad_vocab_size,
                                                 seed_for, set_init)

CASES = [  # full shape, ShardSpec
    ((37,), ShardSpec()),
    ((24, 5), ShardSpec(0)),
    ((24, 7), ShardSpec(0, stride=2)),
    ((9, 24), ShardSpec(1)),
    ((50, 6), ShardSpec(0, unpadded_size=50)),
    ((1000,), ShardSpec(0)),
    ((13, 3), ShardSpec()),
    ((65, 1), ShardSpec()),
    ((8, 3, 8), ShardSpec(2)),
    ((16, 2, 3), ShardSpec(0, stride=2)),
]
GRIDS = [(4, 16), (3, 7), (256, 1 << 15)]  # (INIT_TILE_COLS, INIT_TILE_ELEMENTS)


def reference_full(shape, name: str, seed: int, std: float) -> torch.Tensor:
    """The rule, written out: tile k of the [shape[0], prod(shape[1:])] view drawn from its own seed."""
    rows, cols = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
    tile_cols = min(cols, utils.INIT_TILE_COLS)
    tile_rows = max(1, utils.INIT_TILE_ELEMENTS // tile_cols)
    full, k = torch.empty(rows, cols), 0
    for r in range(0, rows, tile_rows):
        for c in range(0, cols, tile_cols):
            h, w = min(tile_rows, rows - r), min(tile_cols, cols - c)
            generator = torch.Generator().manual_seed(seed_for(seed, name if k == 0 else f"{name}#{k}"))
            full[r:r + h, c:c + w] = torch.empty(h, w).normal_(0.0, std, generator=generator)
            k += 1
    return full.view(shape)


def _param(full_shape, spec, tp, device="cpu"):
    local = list(full_shape)
    if spec.is_sharded:
        rows = pad_vocab_size(spec.unpadded_size, 4, tp) if spec.unpadded_size else full_shape[spec.partition_dim]
        local[spec.partition_dim] = rows // tp
    param = torch.nn.Parameter(torch.empty(local, device=device))
    set_shard_spec(param, spec)
    set_init(param, "normal", 0.5)
    return param


def _layouts(full_shape, spec):
    for tp in (1, 2, 4):
        if spec.is_sharded and not spec.unpadded_size and full_shape[spec.partition_dim] % (tp * spec.stride):
            continue
        for rank in range(tp):
            yield tp, rank


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_shard_and_flat_range_is_the_full_tensors(monkeypatch, grid, case):
    monkeypatch.setattr(utils, "INIT_TILE_COLS", grid[0])
    monkeypatch.setattr(utils, "INIT_TILE_ELEMENTS", grid[1])
    monkeypatch.setattr(utils, "INIT_BLOCK_ELEMENTS", 10)  # several row blocks per shard
    full_shape, spec = CASES[case]
    full = reference_full(full_shape, "w", 3, 0.5)
    for tp, rank in _layouts(full_shape, spec):
        param = _param(full_shape, spec, tp)
        initialize_param(param, "w", 3, rank, tp)
        expected = spec.shard(full, rank, tp, tuple(param.shape))
        assert torch.equal(param.detach(), expected), (full_shape, spec, tp, rank, grid)
        # ZeRO-3 shards: flat ranges of the shard, drawn from a shape-only (meta) parameter.
        meta = _param(full_shape, spec, tp, device="meta")
        n = meta.numel()
        for start, end in ((0, n), (1, n - 1), (n // 3, 2 * n // 3 + 1), (n - 1, n), (5, 5)):
            out = torch.full((end - start,), float("nan"))
            initialize_param_range(meta, out, start, end, InitArgs("w", 3, rank, tp))
            assert torch.equal(out, expected.reshape(-1)[start:end]), (full_shape, spec, tp, rank, start, end)


def test_one_tile_is_one_full_draw_and_zeros_ones_kinds():
    """A tensor of one tile (up to 32 K values) keeps the draw it always had: one normal_ of its full shape."""
    param = _param((64, 32), ShardSpec(0), 2)
    initialize_param(param, "small", 5, 1, 2)
    full = torch.empty(64, 32).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed_for(5, "small")))
    assert torch.equal(param.detach(), full[32:])
    ones = _param((50, 6), ShardSpec(0, unpadded_size=50), 4)
    set_init(ones, "ones")
    initialize_param(ones, "n", 5, 3, 4)  # rows 48..63 of the padded 64: rows 50.. are vocabulary padding
    assert torch.equal(ones.detach(), torch.cat([torch.ones(2, 6), torch.zeros(14, 6)]))


def test_bf16_and_only_the_needed_tiles_are_drawn(monkeypatch):
    """A bf16 shard gets the rounded fp32 values; a rank draws only the tiles its shard (or flat range)
    overlaps: a quarter of them at TP 4, whether the split is along rows or columns."""
    monkeypatch.setattr(utils, "INIT_TILE_COLS", 8)
    monkeypatch.setattr(utils, "INIT_TILE_ELEMENTS", 32)  # 4 x 8 tiles
    drawn = []
    real_draw = utils.draw_tile

    def counting_draw(name, seed, std, index, height, width):
        drawn.append(index)
        return real_draw(name, seed, std, index, height, width)
    monkeypatch.setattr(utils, "draw_tile", counting_draw)
    full = reference_full((64, 32), "w", 3, 0.5)  # 16 x 4 = 64 tiles
    for dim in (0, 1):
        param = torch.nn.Parameter(_param((64, 32), ShardSpec(dim), 4).data.bfloat16())
        set_shard_spec(param, ShardSpec(dim))
        set_init(param, "normal", 0.5)
        drawn.clear()
        initialize_param(param, "w", 3, 1, 4)
        assert torch.equal(param.detach(), ShardSpec(dim).shard(full, 1, 4).bfloat16())
        assert len(drawn) == len(set(drawn)) == 16, (dim, drawn)
    drawn.clear()  # a flat range inside rows 0..3 of the replicated tensor: one row of 4 tiles
    out = torch.empty(40)
    initialize_param_range(_param((64, 32), ShardSpec(), 1, "meta"), out, 50, 90, InitArgs("w", 3))
    assert torch.equal(out, full.reshape(-1)[50:90]) and sorted(drawn) == [0, 1, 2, 3]


def test_missing_init_args_is_a_clear_error():
    with pytest.raises(ValueError, match="no init_args"):
        initialize_param_range(_param((4, 4), ShardSpec(), 1, "meta"), torch.empty(16), 0, 16)
