"""Single-process tests of the tensor-parallel helpers: sharding utils, vocab padding, cross entropy,
RNG tracker and recomputation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.kernels.rope import apply_rotary, rope_cos_sin
from megatron_lite.tensor_parallel import (ShardSpec, checkpoint, full_from_shards, get_all_rng_states,
                                           get_rng_tracker, mask_padded_vocab, model_parallel_seed, pad_vocab_size,
                                           set_all_rng_states, shard_of_full, vocab_parallel_cross_entropy)


def _meta(shape, dim, stride=1, unpadded=None, parallel=True):
    """(ShardSpec, local shape): what shard_of_full/full_from_shards take in place of a parameter."""
    return ShardSpec(dim if parallel else None, stride, unpadded_size=unpadded), tuple(shape)


def test_pad_vocab_size():
    assert pad_vocab_size(50257, 128, 1) == 50304
    assert pad_vocab_size(50257, 128, 4) == 50688
    assert pad_vocab_size(100, 1, 4) == 100
    assert pad_vocab_size(101, 1, 4) == 104


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_round_trip_with_stride_and_padding(tp):
    full = torch.randn(16, 6)
    for dim, stride in [(0, 1), (0, 2), (1, 1)]:
        if full.shape[dim] % (tp * stride):
            continue
        local = list(full.shape)
        local[dim] //= tp
        meta = _meta(tuple(local), dim, stride)
        shards = [shard_of_full(full, meta, r, tp) for r in range(tp)]
        assert torch.equal(full_from_shards(shards, meta), full)
    # stride 2 = [gate; up]: each rank holds its part of gate, then its part of up
    gate_up = torch.arange(8.0).view(8, 1)
    shard = shard_of_full(gate_up, _meta((4, 1), 0, 2), 1, 2)
    assert shard.flatten().tolist() == [2.0, 3.0, 6.0, 7.0]
    # vocabulary 10 padded to 12 over 4 ranks: zero rows at the end, dropped again on the way back
    vocab = torch.randn(10, 3)
    meta = _meta((3, 3), 0, 1, unpadded=10)
    shards = [shard_of_full(vocab, meta, r, 4) for r in range(4)]
    assert torch.equal(shards[3][1:], torch.zeros(2, 3))
    assert torch.equal(full_from_shards(shards, meta), vocab)
    # not tensor-parallel: the full tensor is the shard
    assert shard_of_full(vocab, _meta((10, 3), -1, parallel=False), 1, 4) is vocab


def test_cross_entropy_equals_torch_and_ignores_padding():
    logits = torch.randn(5, 3, 10, requires_grad=True)
    target = torch.randint(0, 10, (5, 3))
    padded = torch.cat([logits, torch.zeros(5, 3, 6)], dim=-1)  # zero rows would win over negative logits
    loss = vocab_parallel_cross_entropy(mask_padded_vocab(padded, 0, 10), target)
    ref = F.cross_entropy(logits.reshape(-1, 10), target.reshape(-1), reduction="none").view(5, 3)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    weights = torch.rand(5, 3)
    (grad,) = torch.autograd.grad((loss * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_rope_matches_llama_definition():
    """Hugging Face Llama: q * cos + rotate_half(q) * sin with inv_freq = base^(-2i/d), on [b, h, s, d]."""
    s, b, h, d, base = 6, 2, 3, 8, 10000.0
    x = torch.randn(s, b, h, d)
    positions = torch.arange(s).expand(b, s)
    cos, sin = rope_cos_sin(positions, d, base)
    ours = apply_rotary(x, cos, sin)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(s).float()[:, None] * inv_freq  # [s, d/2]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    c, sn = angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]
    ref = torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], dim=-1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_rng_tracker_streams_and_state_round_trip():
    model_parallel_seed(123)
    tracker = get_rng_tracker()
    default_draw = torch.rand(4)
    with tracker.fork():
        tp_draw = torch.rand(4)
    assert not torch.equal(default_draw, tp_draw)
    states = get_all_rng_states()
    after = (torch.rand(3), _forked_draw())
    set_all_rng_states(states)
    assert torch.equal(torch.rand(3), after[0]) and torch.equal(_forked_draw(), after[1])
    # forking does not advance the default stream
    model_parallel_seed(123)
    _forked_draw()
    assert torch.equal(torch.rand(4), default_draw)


def _forked_draw():
    with get_rng_tracker().fork():
        return torch.rand(3)


def test_checkpoint_replays_dropout_of_both_streams():
    model_parallel_seed(7)
    weight = torch.randn(8, 8, requires_grad=True)

    def block(x):
        y = F.dropout(x @ weight, 0.5, training=True)  # default stream
        with get_rng_tracker().fork():
            return F.dropout(y, 0.5, training=True)  # TP stream

    x = torch.randn(4, 8, requires_grad=True)
    grads = []
    for recompute in (False, True):
        model_parallel_seed(7)
        out = checkpoint(block, x) if recompute else block(x)
        grads.append(torch.autograd.grad(out.square().sum(), (x, weight)))
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)
