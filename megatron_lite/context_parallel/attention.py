"""Attention over a sequence split across the CP group: the dispatcher the model calls, all-gather
attention (`--cp-comm-type all_gather`) and Ulysses all-to-all attention (`--cp-comm-type a2a`).

Every variant takes this rank's q [b, heads, s_local, d], k and v [b, groups, s_local, d] (its tokens in
the load-balanced layout, `layout.local_indices`) and the global attention mask [b or 1, 1, s, s] (True =
masked; None = causal), and returns this rank's output [b, heads, s_local, d]: the rows of the
one-process result for its tokens. Masks are always built from global indices, so documents crossing
chunk boundaries and the causal order come out exactly as in one process.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_lite import collectives
from megatron_lite.context_parallel.layout import block_mask, gathered_indices, local_indices
from megatron_lite.context_parallel.ring import ring_attention
from megatron_lite.process_groups import Group

COMM_TYPES = ("p2p", "all_gather", "a2a")


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 3 of a stacked [2, b, g, s, d] K/V) over CP; backward
    reduce-scatters the gradient, so each rank gets the sum of every rank's dK/dV for its own tokens."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return collectives.all_gather(tensor, group, dim=3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return collectives.reduce_scatter(grad, ctx.group, dim=3), None


def all_gather_attention(q, k, v, attention_mask: Optional[torch.Tensor], group: Group, attention_fn: Callable,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """Local queries against K and V gathered from every CP rank (Llama 3's choice): simple, and the
    gather of the next layer's K/V cannot overlap, but K/V are small under GQA."""
    seq = q.shape[2] * group.size
    kv = _GatherSequence.apply(torch.stack([k, v]), group)
    mask = block_mask(attention_mask, local_indices(seq, group.size, group.rank, q.device),
                      gathered_indices(seq, group.size, q.device))
    return attention_fn(q, kv[0], kv[1], mask, dropout_p=dropout_p, causal=False)


def _sequence_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, H, s_local, d] -> [b, H / CP, s, d]: this rank keeps head chunk `rank` of the whole sequence
    (gathered in CP rank order)."""
    b, heads, local, d = x.shape
    cp = group.size
    chunks = x.reshape(b, cp, heads // cp, local, d).transpose(0, 1).contiguous()
    out = torch.empty_like(chunks)
    collectives.all_to_all_single(out, chunks, group)  # out[c]: rank c's tokens of this rank's heads
    return out.permute(1, 2, 0, 3, 4).reshape(b, heads // cp, cp * local, d)


def _heads_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The inverse: [b, H / CP, s, d] -> [b, H, s_local, d]."""
    b, heads_part, seq, d = x.shape
    cp = group.size
    chunks = x.reshape(b, heads_part, cp, seq // cp, d).permute(2, 0, 1, 3, 4).contiguous()
    out = torch.empty_like(chunks)
    collectives.all_to_all_single(out, chunks, group)  # out[c]: head chunk c of this rank's tokens
    return out.transpose(0, 1).reshape(b, heads_part * cp, seq // cp, d)


class _AllToAll(torch.autograd.Function):
    """Sequence-sharded <-> head-sharded; the backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return _sequence_to_heads(x, group) if to_heads else _heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        return (_heads_to_sequence(grad, ctx.group) if ctx.to_heads else _sequence_to_heads(grad, ctx.group)), None, None


def ulysses_attention(q, k, v, attention_mask: Optional[torch.Tensor], group: Group, attention_fn: Callable,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """DeepSpeed-Ulysses: all-to-all to whole sequences of heads / CP heads, attention, all-to-all back.
    With fewer K/V groups than CP can split, each group is replicated to its query heads (GQA becomes
    MHA for the exchange); the replication's backward sums the copies' gradients."""
    heads, groups = q.shape[1], k.shape[1]
    if heads % group.size != 0:
        raise ValueError(f"a2a context parallelism: {heads} local attention heads are not divisible by CP = {group.size}")
    if groups % group.size != 0:
        k, v = k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)
    seq = q.shape[2] * group.size
    q_h, k_h, v_h = (_AllToAll.apply(t, group, True) for t in (q, k, v))
    index = gathered_indices(seq, group.size, q.device)
    out = attention_fn(q_h, k_h, v_h, block_mask(attention_mask, index, index), dropout_p=dropout_p, causal=False)
    return _AllToAll.apply(out, group, False)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], group: Group, comm_type: str,
                               attention_fn: Callable, dropout_p: float = 0.0) -> torch.Tensor:
    """This rank's rows of attention over the whole sequence, by `comm_type` (see the module docstring).
    Attention dropout masks are this rank's own draws (the TP-rank stream): equal in distribution to the
    masks one process would draw, not element for element."""
    if comm_type == "p2p":
        return ring_attention(q, k, v, attention_mask, group, dropout_p=dropout_p)
    if comm_type == "all_gather":
        return all_gather_attention(q, k, v, attention_mask, group, attention_fn, dropout_p)
    if comm_type == "a2a":
        return ulysses_attention(q, k, v, attention_mask, group, attention_fn, dropout_p)
    raise ValueError(f"--cp-comm-type: unknown {comm_type!r}; use one of {', '.join(COMM_TYPES)}")
