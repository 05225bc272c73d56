"""The load-balanced layout of context parallelism, in one process: which tokens each CP rank holds, how a
batch is sliced, and that the attention work (FLOPs) per rank is equal under a causal mask."""
import pytest
import torch

from megatron_lite.context_parallel.layout import (attention_pairs, gathered_indices, local_indices, ring_plan,
                                                   slice_batch_for_cp, visible_pairs)
from megatron_lite.process_groups import Group


def test_rank_r_holds_chunks_r_and_2cp_minus_1_minus_r():
    assert local_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(gathered_indices(48, 4).tolist()) == list(range(48))
    with pytest.raises(ValueError, match="not divisible by 2 x CP"):
        local_indices(12, 4, 0)


def test_slice_batch_keeps_the_mask_whole():
    batch = {"tokens": torch.arange(16).view(1, 16), "labels": torch.arange(1, 17).view(1, 16),
             "loss_mask": torch.ones(1, 16), "position_ids": torch.arange(16).view(1, 16),
             "attention_mask": torch.ones(1, 1, 16, 16, dtype=torch.bool)}
    local = slice_batch_for_cp(batch, Group("cp", (0, 1), 1, object()))
    assert local["tokens"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert local["labels"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert local["position_ids"].tolist() == local["tokens"].tolist()
    assert local["attention_mask"].shape == (1, 1, 16, 16)


@pytest.mark.parametrize("cp", [2, 4, 8])
@pytest.mark.parametrize("comm", ["p2p", "all_gather", "a2a"])
def test_attention_flops_per_rank_are_equal(cp, comm):
    """FLOPs per rank = 4 x head_dim x heads x pairs; pairs counted from the ring's plan (what ring.py
    executes), all-gather's local x global block and Ulysses' whole-sequence heads. The useful
    (causally visible) pairs are also equal across ranks: the layout's point."""
    seq = 8192
    pairs = [attention_pairs(cp, rank, seq, comm) for rank in range(cp)]
    assert max(pairs) <= 1.01 * min(pairs), pairs
    visible = [visible_pairs(cp, rank, seq) for rank in range(cp)]
    assert max(visible) <= 1.01 * min(visible), visible
    assert sum(visible) == seq * (seq + 1) // 2
    if comm == "p2p":  # the ring skips the invisible halves: about half of the all-gather's work
        assert pairs[0] == (seq // cp) ** 2 + (cp - 1) * (seq // cp) ** 2 // 2


def test_contiguous_split_would_be_unbalanced():
    """Why the layout: with a plain contiguous split the last rank has 2CP-1 times the first's work."""
    seq, cp = 1024, 4
    contiguous = [sum(range(r * seq // cp + 1, (r + 1) * seq // cp + 1)) for r in range(cp)]
    assert contiguous[-1] > 6 * contiguous[0]
    plan = ring_plan(cp, 1, seq // cp, causal_only=True)
    assert [b.kv_rank for b in plan] == [1, 0, 3, 2] and not any(b.masked for b in plan[1:])
