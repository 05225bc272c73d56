"""Layout-invariant initialisation drawn in chunks (issue 19 item 7): for every ShardSpec the model uses
(replicated, row- and column-split, SwiGLU's stride 2, the padded vocabulary) and awkward sizes (not a
multiple of 16, tails under 16 values, one-element rows), every TP rank's shard equals, bit for bit, the
shard of one full `normal_` draw (the previous implementation, rebuilt here independently)."""
import pytest
import torch

from megatron_lite.tensor_parallel import utils
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec
from megatron_lite.tensor_parallel.utils import initialize_param, pad_vocab_size, seed_for, set_init

CASES = [  # full shape, ShardSpec
    ((37,), ShardSpec()),
    ((24, 5), ShardSpec(0)),
    ((24, 7), ShardSpec(0, stride=2)),
    ((9, 24), ShardSpec(1)),
    ((50, 6), ShardSpec(0, unpadded_size=50)),
    ((1000,), ShardSpec(0)),
    ((13, 3), ShardSpec()),
    ((65, 1), ShardSpec()),
]


def _param(full_shape, spec, tp):
    local = list(full_shape)
    if spec.is_sharded:
        rows = pad_vocab_size(spec.unpadded_size, 4, tp) if spec.unpadded_size else full_shape[spec.partition_dim]
        local[spec.partition_dim] = rows // tp
    param = torch.nn.Parameter(torch.empty(local))
    set_shard_spec(param, spec)
    set_init(param, "normal", 0.5)
    return param


@pytest.mark.parametrize("chunk", [16, 48, 64, 1 << 22])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_chunked_draw_equals_the_full_draw_for_every_tp_rank(monkeypatch, chunk, case):
    monkeypatch.setattr(utils, "INIT_CHUNK_ELEMENTS", chunk)
    full_shape, spec = CASES[case]
    full = torch.empty(full_shape).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed_for(3, "w")))
    for tp in (1, 2, 4):
        if spec.is_sharded and not spec.unpadded_size and full_shape[spec.partition_dim] % (tp * spec.stride):
            continue
        for rank in range(tp):
            param = _param(full_shape, spec, tp)
            initialize_param(param, "w", 3, rank, tp)
            expected = spec.shard(full, rank, tp, tuple(param.shape))
            assert torch.equal(param.detach(), expected), (full_shape, spec, tp, rank, chunk)


def test_bf16_and_memory_bound(monkeypatch):
    """A bf16 shard gets the rounded fp32 draw; the largest temporary is one chunk, not the full tensor."""
    monkeypatch.setattr(utils, "INIT_CHUNK_ELEMENTS", 64)
    full = torch.empty(256, 4).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed_for(3, "w")))
    param = _param((256, 4), ShardSpec(0), 4).data.bfloat16()
    param = torch.nn.Parameter(param)
    set_shard_spec(param, ShardSpec(0))
    set_init(param, "normal", 0.5)
    sizes = []
    real_empty = torch.empty

    def recording_empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        sizes.append(out.numel())
        return out
    monkeypatch.setattr(torch, "empty", recording_empty)
    initialize_param(param, "w", 3, 1, 4)
    monkeypatch.undo()
    assert torch.equal(param.detach(), full[64:128].bfloat16())
    assert max(sizes) <= 64 and sizes, sizes  # chunks of 64 values; the full 1024 never drawn at once
    assert len(sizes) == 8  # 16 rows a chunk; rank 1 needs rows 64..127: drawing stops after 8 of 16 chunks
