"""The output layer's GEMM and the (vocab-parallel) cross entropy fused, a chunk of tokens at a time.

The unfused path materialises [tokens, vocab/tp] logits, an fp32 copy, and a softmax of that size kept
for backward: for a 128K vocabulary and 8K tokens per micro-batch that is 4 GiB per copy, and on CPU every
pass over it goes to DRAM. Here each chunk of tokens goes through GEMM -> softmax -> loss -> gradients
before the next one starts, so only [chunk, vocab/tp] is live (sized to stay in cache on CPU), and what is
kept for backward is d loss/d x ([tokens, hidden]) and d loss/d weight ([vocab/tp, hidden], fp32).

Gradients in forward need the per-token weights the loss will put on each token. The caller passes them
(`grad_weights`: the loss mask; None = all ones). Backward receives the true per-token gradient g. Rows
of d x scale by g exactly whatever g is; d weight is exact when g = c * grad_weights for one scalar c,
which every masked-mean / masked-sum loss gives. Backward checks that, and otherwise recomputes the chunks
with the true g: any loss gets exact gradients, the usual ones get them without a second GEMM pass.

Semantics equal tensor_parallel.cross_entropy.vocab_parallel_cross_entropy(mask_padded_vocab(x @ W^T)):
the input is this TP rank's full-sequence activation (after copy_to_tensor_model_parallel_region or the
sequence-parallel all-gather, whose backward sums the partial d x over TP), `weight` this rank's
vocabulary slice, padded entries (global index >= vocab_size) are -inf.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lite.process_groups import Group
from megatron_lite.tensor_parallel.cross_entropy import all_reduce_over_tp, local_targets, subtract_one_hot_
from megatron_lite.tensor_parallel.layers import mask_padded_vocab

# Bytes of fp32 logits per chunk. CPU: a few MiB that stay in L2/L3 while the softmax passes run over them
# (of 2-32 MiB, 8-16 MiB were fastest for vocab 8192, hidden 256 on a 2-core EPYC). GPU: large enough
# for full-rate GEMMs and few launches.
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}


def default_chunk_tokens(vocab_local: int, device_type: str) -> int:
    return max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"]) // (4 * vocab_local))


def _chunks(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int,
            chunk_tokens: int, tp_group: Group, weights: Optional[torch.Tensor], want_dx: bool, want_dw: bool):
    """One pass over the tokens: the per-token loss and, if wanted, d loss/d x (unweighted: the caller
    scales its rows) and d loss/d weight for per-token weights `weights` (None = all 1)."""
    tokens, vocab_local = x.shape[0], weight.shape[0]
    loss = torch.empty(tokens, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if want_dx else None
    dw = (torch.empty if tokens else torch.zeros)(weight.shape, dtype=torch.float32, device=x.device) if want_dw else None
    # One logits buffer (and an fp32 one for low-precision weights) reused by every chunk: fresh
    # multi-MiB allocations cost page faults on CPU, as much as the GEMM that fills them.
    rows = min(chunk_tokens, tokens)
    gemm_buf = torch.empty(rows, vocab_local, dtype=weight.dtype, device=x.device)
    fp32_buf = gemm_buf if weight.dtype == torch.float32 else torch.empty(rows, vocab_local, device=x.device)
    for s in range(0, tokens, chunk_tokens):
        e = min(s + chunk_tokens, tokens)
        xc, tc = x[s:e], target[s:e]
        low = torch.mm(xc, weight.t(), out=gemm_buf[:e - s])
        logits = low if low.dtype == torch.float32 else fp32_buf[:e - s].copy_(low)
        mask_padded_vocab(logits, vocab_start, vocab_size)  # in place
        logits_max = logits.amax(dim=-1)
        all_reduce_over_tp(logits_max, tp_group, op="max")
        logits.sub_(logits_max.unsqueeze(-1))
        local_t, outside = local_targets(tc, vocab_start, vocab_local)
        stats = torch.empty(2, e - s, dtype=torch.float32, device=x.device)
        stats[0] = logits.gather(-1, local_t).squeeze(-1).masked_fill(outside, 0.0)
        logits.exp_()
        torch.sum(logits, dim=-1, out=stats[1])
        all_reduce_over_tp(stats, tp_group)  # [target logit, sum of exp], summed over the vocabulary slices
        loss[s:e] = stats[1].log() - stats[0]
        if not (want_dx or want_dw):
            continue
        grad = subtract_one_hot_(logits.div_(stats[1].unsqueeze(-1)), local_t, outside)  # softmax - one-hot
        if want_dx:
            torch.mm(low.copy_(grad) if low is not grad else grad, weight, out=dx[s:e])
        if want_dw:
            if weights is not None:
                grad.mul_(weights[s:e].unsqueeze(-1))
            grad = low.copy_(grad) if low is not grad else grad  # in the GEMM's dtype
            if dw.dtype != grad.dtype:  # bf16/fp16 GEMM, accumulated over the chunks in fp32
                part = torch.mm(grad.t(), xc)
                dw.copy_(part) if s == 0 else dw.add_(part)
            elif s == 0:  # the first chunk writes d weight: no zero-fill pass
                torch.mm(grad.t(), xc, out=dw)
            else:
                dw.addmm_(grad.t(), xc)
    return loss, dx, dw


def _scale_of(g: torch.Tensor, weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The scalar c with g == c * weights (weights None = ones), or None if there is none."""
    if g.numel() == 0:
        return g.new_zeros(())
    w = torch.ones_like(g) if weights is None else weights.float()
    i = int(w.abs().argmax())
    if w[i] == 0:
        return g.new_zeros(()) if not g.any() else None
    c = g[i] / w[i]
    expected = c * w
    return c if bool(((g - expected).abs() <= 1e-6 * expected.abs() + 1e-30).all()) else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, grad_weights: Optional[torch.Tensor],
                vocab_start: int, vocab_size: int, chunk_tokens: int, tp_group: Group) -> torch.Tensor:
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dx, dw = _chunks(x, weight, target, vocab_start, vocab_size, chunk_tokens, tp_group, grad_weights,
                               want_dx, want_dw)
        ctx.save_for_backward(x, weight, target, grad_weights, dx, dw)
        ctx.args = (vocab_start, vocab_size, chunk_tokens, tp_group)
        ctx.used = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("the fused output layer + cross entropy supports one backward per forward (its "
                               "gradients are computed in forward); for retain_graph=True use --no-cross-entropy-fusion")
        ctx.used = True
        x, weight, target, grad_weights, dx, dw = ctx.saved_tensors
        g = grad_loss.float()
        grad_x = grad_w = None
        if dx is not None:
            grad_x = dx.mul_(g.unsqueeze(-1)) if dx.dtype == torch.float32 else (dx.float() * g.unsqueeze(-1)).to(dx.dtype)
        if dw is not None:
            # g and the weights are the same on every TP rank (replicated loss), so all ranks take the
            # same branch: the recompute's all-reduces cannot be entered by only some of them.
            c = _scale_of(g, grad_weights)
            if c is not None:
                grad_w = dw.mul_(c).to(weight.dtype)  # in place: the buffer is not needed after this
            else:  # a loss that weights tokens otherwise: one more pass with the true per-token gradient
                _, _, dw = _chunks(x, weight, target, *ctx.args, g, False, True)
                grad_w = dw.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, vocab_start: int = 0,
                         vocab_size: Optional[int] = None, grad_weights: Optional[torch.Tensor] = None,
                         chunk_tokens: Optional[int] = None, tp_group: Optional[Group] = None) -> torch.Tensor:
    """Per-token fp32 loss of (x @ weight^T) against target, shape of target.

    x [..., hidden] (leading dims those of target), weight [vocab/tp, hidden] (this TP rank's slice,
    starting at global index vocab_start), vocab_size the unpadded vocabulary (None: no padding).
    grad_weights [...]: the weights the loss will give each token (the loss mask), a speed hint only.
    tp_group: the tensor-parallel group the vocabulary is split over (default: one rank).
    """
    tp_group = tp_group or Group.single("tp")
    hidden = x.shape[-1]
    if x.shape[:-1] != target.shape:
        raise ValueError(f"linear_cross_entropy: input {tuple(x.shape)} and target {tuple(target.shape)} differ in "
                         "their leading (token) dimensions")
    vocab_size = vocab_start + weight.shape[0] if vocab_size is None else vocab_size
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0], x.device.type)
    flat_w = None if grad_weights is None else grad_weights.reshape(-1).to(torch.float32)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):  # evaluation: loss only
        loss, _, _ = _chunks(x.reshape(-1, hidden), weight, target.reshape(-1), vocab_start, vocab_size, chunk_tokens,
                             tp_group, None, False, False)
        return loss.view(target.shape)
    loss = _LinearCrossEntropy.apply(x.reshape(-1, hidden), weight, target.reshape(-1), flat_w, vocab_start,
                                     vocab_size, chunk_tokens, tp_group)
    return loss.view(target.shape)
