"""Ring attention (`--cp-comm-type p2p`, megatron-core's name).

Each CP rank keeps its queries; the K/V blocks travel around the CP ring. At every step a rank starts
sending the block it holds to the next rank (and receiving the previous rank's) and, while that is in
flight, computes its queries against the block it holds: the communication is overlapped with the
block's attention. Partial results are merged with the log-sum-exp rule (online softmax), so the result
is softmax(QK^T)V over the whole sequence. Backward recomputes each block's probabilities from the
saved log-sum-exp and passes the K/V blocks around the ring again, each with its dK/dV accumulator, which
ends on the rank that owns the block.

Which halves of a block are computed is `layout.ring_plan`: under a plain causal mask the load-balanced
layout lets every step after the first skip half the block.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_lite import collectives
from megatron_lite.context_parallel.layout import block_mask, local_indices, ring_plan
from megatron_lite.process_groups import Group

NEG_INF = float("-inf")


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row that sees no key yet) replaced by 0, so exp(x - lse) stays 0 instead of NaN."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = t.shape[1]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=1)


def _probabilities(q, k, mask, lse, scale):
    """exp(q k^T * scale - lse) in fp32, masked entries 0."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, NEG_INF)
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - _finite(lse)[..., None]), lse


def block_forward(q, k, v, mask, scale, keep=None):
    """Attention of queries q [b, h, sq, d] to one K/V block [b, g, sk, d]: (unnormalised-merge-ready
    output [b, h, sq, d] fp32, log-sum-exp [b, h, sq] fp32; -inf for rows that see no key of the block).
    `keep` (attention dropout) is the block's [b, h, sq, sk] keep mask already scaled by 1/(1-p): it
    multiplies the probabilities that weight V, not the log-sum-exp (dropout follows the softmax)."""
    heads = q.shape[1]
    probs, lse = _probabilities(q, _expand_groups(k, heads), mask, None, scale)
    if keep is not None:
        probs = probs * keep
    return torch.matmul(probs, _expand_groups(v, heads).float()), lse


def merge(out, lse, block_out, block_lse) -> None:
    """out, lse (in place) <- the softmax over the keys of both; the online-softmax rule."""
    new_lse = torch.logaddexp(lse, block_lse)
    finite = _finite(new_lse)
    out.mul_(torch.exp(lse - finite)[..., None]).add_(block_out * torch.exp(block_lse - finite)[..., None])
    lse.copy_(new_lse)


def block_backward(q, k, v, dout, lse, delta, mask, scale, keep=None):
    """Gradients (dq [b, h, sq, d], dk, dv [b, g, sk, d]) of one block, from the final log-sum-exp.
    With dropout (O = (keep * P) V) the softmax correction term is still rowsum(dO * O) (`delta`), as in
    FlashAttention-2: rowsum(P * (keep * dO V^T)) = rowsum(dO * O)."""
    heads, groups = q.shape[1], k.shape[1]
    k_heads, v_heads = _expand_groups(k, heads).float(), _expand_groups(v, heads).float()
    probs, _ = _probabilities(q, k_heads, mask, lse, scale)
    dprobs = torch.matmul(dout, v_heads.transpose(-1, -2))
    if keep is not None:
        dprobs = dprobs * keep
    dv = torch.matmul((probs if keep is None else probs * keep).transpose(-1, -2), dout)
    dscores = probs * (dprobs - delta[..., None])
    dq = torch.matmul(dscores, k_heads) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q.float()) * scale
    if groups != heads:
        b, _, sk, d = dk.shape
        dk = dk.view(b, groups, heads // groups, sk, d).sum(2)
        dv = dv.view(b, groups, heads // groups, sk, d).sum(2)
    return dq, dk, dv


class _Dropout:
    """Attention dropout of the ring's blocks. One seed is drawn per call from the current RNG (under
    SelfAttention's tracker fork: the TP-rank stream; recompute restores it, so the replay draws the same
    seed); block i's keep mask comes from a generator seeded (seed, i), so backward regenerates it instead
    of saving [b, h, s_local, s_local] masks. The masks are this rank's own draws: equal in distribution to
    one process's, not equal element for element (one process draws the whole [s, s] matrix at once)."""

    def __init__(self, p: float, device: torch.device):
        self.p, self.device = p, device
        self.seed = int(torch.randint(0, 2 ** 62, (1,), device=device).item()) if p > 0 else 0

    def keep(self, block, shape) -> Optional[torch.Tensor]:
        if self.p == 0:
            return None
        generator = torch.Generator(device=self.device).manual_seed(self.seed + block.step)
        draws = torch.rand(shape, generator=generator, device=self.device)
        return (draws >= self.p).float().div_(1.0 - self.p)


def _ring_exchange(tensor: torch.Tensor, group: Group):
    """Start sending `tensor` to the next CP rank and receiving the previous rank's into a new buffer."""
    following = group.global_rank((group.rank + 1) % group.size)
    preceding = group.global_rank((group.rank - 1) % group.size)
    received = torch.empty_like(tensor)
    works = collectives.batch_isend_irecv([collectives.P2P("send", tensor, following, group),
                                           collectives.P2P("recv", received, preceding, group)])
    return received, works


def _wait(works) -> None:
    for work in works:
        work.wait()


def _ring_blocks(kv: torch.Tensor, plan, group: Group, overlap: bool, query_index, seq: int, attention_mask):
    """Yield (block, its K/V, rows, cols, mask) for every block of the plan, forward and backward alike: the
    next block's exchange is posted before a block is yielded (computed) and waited for after."""
    for block in plan:
        received, works = _ring_exchange(kv, group) if block.step < group.size - 1 else (None, [])
        if not overlap:  # benchmarks only: the exchange first, then the block (nothing hidden)
            _wait(works)
            works = []  # a gloo work is waited on once
        rows, cols = slice(block.q_start, block.q_end), slice(block.k_start, block.k_end)
        key_index = local_indices(seq, group.size, block.kv_rank, kv.device)[cols]
        mask = block_mask(attention_mask, query_index[rows], key_index) if block.masked else None
        yield block, kv, rows, cols, mask
        _wait(works)
        kv = received


class RingAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over the whole sequence, with q, k, v this rank's [b, h|g, s_local, d]
    and `attention_mask` the global [b or 1, 1, s, s] bool mask (True = masked) or None (causal);
    attention dropout with probability `dropout_p` (see _Dropout)."""

    @staticmethod
    def forward(ctx, q, k, v, attention_mask: Optional[torch.Tensor], group: Group, scale: float,
                overlap: bool = True, dropout_p: float = 0.0):
        b, heads, local, d = q.shape
        seq, plan = local * group.size, ring_plan(group.size, group.rank, local, attention_mask is None)
        query_index = local_indices(seq, group.size, group.rank, q.device)
        dropout = _Dropout(dropout_p, q.device)
        out = torch.zeros(b, heads, local, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, heads, local), NEG_INF, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for block, kv, rows, cols, mask in _ring_blocks(kv, plan, group, overlap, query_index, seq, attention_mask):
            keep = dropout.keep(block, (b, heads, rows.stop - rows.start, cols.stop - cols.start))
            block_out, block_lse = block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], mask, scale, keep)
            merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
        ctx.group, ctx.scale, ctx.plan, ctx.overlap, ctx.dropout = group, scale, plan, overlap, dropout
        ctx.save_for_backward(q, k, v, out, lse, attention_mask)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, attention_mask = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        b, heads, local, _ = q.shape
        seq = local * group.size
        query_index = local_indices(seq, group.size, group.rank, q.device)
        dout = dout.float()
        delta = (dout * out).sum(-1)  # rowsum(dO * O): the softmax backward's correction term
        dq = torch.zeros_like(out)
        dkv = torch.zeros((2,) + tuple(k.shape), dtype=torch.float32, device=k.device)
        dkv_sending, dkv_works = None, []
        blocks = _ring_blocks(torch.stack([k, v]).contiguous(), ctx.plan, group, ctx.overlap, query_index, seq,
                              attention_mask)
        for block, kv, rows, cols, mask in blocks:
            keep = ctx.dropout.keep(block, (b, heads, rows.stop - rows.start, cols.stop - cols.start))
            dq_block, dk_block, dv_block = block_backward(
                q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], dout[:, :, rows], lse[:, :, rows],
                delta[:, :, rows], mask, scale, keep)
            dq[:, :, rows] += dq_block
            _wait(dkv_works)  # this block's accumulator (sent on by the previous rank) has arrived
            dkv[0][:, :, cols] += dk_block
            dkv[1][:, :, cols] += dv_block
            if group.size > 1:  # the accumulator follows its block; after the last step it is home
                dkv_sending = dkv
                dkv, dkv_works = _ring_exchange(dkv_sending, group)
                if not ctx.overlap:
                    _wait(dkv_works)
                    dkv_works = []
        _wait(dkv_works)
        del dkv_sending
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   group: Group, overlap: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    """Ring attention of this rank's queries over the whole sequence (see RingAttention). overlap=False
    waits for each exchange before computing (benchmarks measure how much communication the ring hides)."""
    return RingAttention.apply(q, k, v, attention_mask, group, 1.0 / math.sqrt(q.shape[-1]), overlap, dropout_p)
