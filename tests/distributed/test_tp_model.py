"""Tensor (and sequence) parallel GPT equals the single-process model built with the same seed.

Each spawned rank first builds the TP=1 reference and runs it (before any parallel group exists, so
every mapping is the identity), then initialises TP groups and checks, for every variant: each
parameter gathered to full shape equals the reference's, logits (gathered over the vocabulary), the
per-token loss and every parameter's gradient (gathered to full shape) match. The reference computes
the loss from materialised logits; the TP models use the fused output layer + cross entropy.

Tolerance (fp32): rtol 1e-5, atol 1e-6 for logits/loss; grads rtol 1e-5, atol 5e-7 (observed: at most
1.2e-7, and 2.7e-7 for the 50257-token vocabulary at TP 4, where the fused output layer scales d x after
its GEMM rather than before: only the rounding order changes).
"""
from __future__ import annotations

import pytest
import torch

from megatron_lite import collectives
from megatron_lite import parallel_state as ps
from megatron_lite.config import Config
from megatron_lite.testing import run_distributed

LOGITS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=5e-7)


def make_config(style: str, tp: int = 1, sp: bool = False, vocab: int = 100, divisible_by: int = 8,
                **overrides) -> Config:
    cfg = Config(world_size=tp)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = 2, 32, 4, 16, 100
    m.hidden_dropout = m.attention_dropout = 0.0
    m.vocab_size, m.make_vocab_size_divisible_by = vocab, divisible_by
    if style == "llama":
        m.num_attention_heads, m.group_query_attention, m.num_query_groups = 8, True, 4  # 2 heads per group
        m.position_embedding_type, m.swiglu, m.normalization = "rope", True, "RMSNorm"
        m.add_bias_linear, m.untie_embeddings_and_output_weights = False, True
        m.ffn_hidden_size = 64
    for key, value in overrides.items():
        setattr(m, key, value)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.sequence_parallel = sp
    cfg.training.seed = 77
    return cfg.validate()


def make_batch(vocab: int, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def run_model(model, ids, labels):
    """logits (gathered, unpadded), loss, and full-shape params and grads of a model."""
    from megatron_lite.tensor_parallel import allreduce_sequence_parallel_grads, gather_full_param
    with torch.no_grad():
        logits = model(ids)
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = collectives.all_gather(logits, ps.get_tensor_model_parallel_group(), dim=-1)
    logits = logits[..., :model.vocab_size]
    # A masked mean, as pretrain_gpt's loss, with the mask passed as the fused output layer's hint.
    mask = (torch.arange(ids.numel()) % 3 != 0).float().view_as(ids)
    loss = model(ids, labels=labels, loss_mask=mask)
    ((loss * mask).sum() / mask.sum()).backward()
    allreduce_sequence_parallel_grads([model], model.tp_group)
    params = {n: gather_full_param(p, group=model.tp_group).clone() for n, p in model.named_parameters()}
    grads = {n: gather_full_param(p, p.grad, group=model.tp_group).clone() for n, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.detach(), "params": params, "grads": grads}


def compare(result, ref, tag):
    torch.testing.assert_close(result["logits"], ref["logits"], **LOGITS_TOL, msg=lambda m: f"{tag} logits: {m}")
    torch.testing.assert_close(result["loss"], ref["loss"], **LOGITS_TOL, msg=lambda m: f"{tag} loss: {m}")
    assert result["params"].keys() == ref["params"].keys(), tag
    worst = 0.0
    for name in ref["params"]:
        assert torch.equal(result["params"][name], ref["params"][name]), f"{tag} init differs: {name}"
        torch.testing.assert_close(result["grads"][name], ref["grads"][name], **GRAD_TOL,
                                   msg=lambda m, name=name: f"{tag} grad {name}: {m}")
        worst = max(worst, (result["grads"][name] - ref["grads"][name]).abs().max().item())
    return worst


def _layout_invariance(tp: int, variants: list[tuple[str, bool, int, int]]) -> dict:
    from megatron_lite.models.gpt import GPTModel
    from megatron_lite.tensor_parallel import model_parallel_seed
    refs = {}
    for style, sp, vocab, divisible_by in variants:  # single-process references first: no groups yet
        ids, labels = make_batch(vocab)
        # The reference is the unfused path (materialised logits, vocab-parallel CE); the TP models use
        # the default kernels (output GEMM + CE fused in chunks, statistics all-reduced over TP).
        ref_cfg = make_config(style, 1, False, vocab, divisible_by, cross_entropy_fusion=False)
        refs[(style, vocab, divisible_by)] = run_model(GPTModel(ref_cfg), ids, labels)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    groups = ps.get_process_groups()
    model_parallel_seed(77, groups.tp.rank)
    worst = {}
    for style, sp, vocab, divisible_by in variants:
        ids, labels = make_batch(vocab)
        model = GPTModel(make_config(style, tp, sp, vocab, divisible_by), groups=groups)
        assert model.kernels.fuses_output_layer
        tag = f"tp={tp} sp={sp} {style} vocab={vocab}"
        worst[tag] = compare(run_model(model, ids, labels), refs[(style, vocab, divisible_by)], tag)
    return worst


VARIANTS = [(style, sp, 100, 8) for style in ("gpt2", "llama") for sp in (False, True)]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_sp_equals_single_process(tp):
    variants = VARIANTS if tp > 1 else [v for v in VARIANTS if not v[1]]
    if tp == 4:  # a vocabulary that no TP size divides, with Megatron's default padding
        variants = variants + [("gpt2", True, 50257, 128)]
    results = run_distributed(_layout_invariance, tp, tp=tp, variants=variants)
    print(results[0])


def _recompute_with_dropout() -> list[torch.Tensor]:
    """TP=2 with dropout on: recomputation replays both RNG streams, so grads are bit-identical to no
    recomputation; without SP the replicated-region dropout masks agree across TP ranks (same loss)."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    ids, labels = make_batch(100)
    return [_recompute_case(sp, ids, labels) for sp in (False, True)]


def _recompute_case(sp: bool, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from megatron_lite.models.gpt import GPTModel
    from megatron_lite.tensor_parallel import allreduce_sequence_parallel_grads, model_parallel_seed
    results = {}
    for name, recompute in [("none", {}), ("selective", dict(recompute_granularity="selective")),
                            ("uniform", dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
                            ("block", dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1))]:
        groups = ps.get_process_groups()
        model = GPTModel(make_config("llama", 2, sp, hidden_dropout=0.2, attention_dropout=0.2, **recompute),
                         groups=groups).train()
        model_parallel_seed(1234, groups.tp.rank)
        loss = model(ids, labels=labels)
        loss.mean().backward()
        allreduce_sequence_parallel_grads([model], groups.tp)
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_loss, ref_grads = results.pop("none")
    for name, (loss, grads) in results.items():
        assert torch.equal(loss, ref_loss), name
        for param_name, grad in grads.items():
            assert torch.equal(grad, ref_grads[param_name]), (name, param_name)
    return ref_loss


def test_recompute_identical_grads_with_dropout_tp2():
    rank0, rank1 = run_distributed(_recompute_with_dropout, 2)
    torch.testing.assert_close(rank0[0], rank1[0], rtol=0, atol=0)  # without SP, TP ranks agree exactly


def _fused_cross_entropy_tp2(upstream: str) -> float:
    """The fused output layer + CE at TP 2 (each rank one vocabulary slice, statistics all-reduced) against
    the single-process unfused path, for a masked-mean upstream gradient (d weight from forward) and an
    arbitrary one (backward recomputes, all-reducing again)."""
    from megatron_lite.kernels.linear_cross_entropy import linear_cross_entropy
    from megatron_lite.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_lite.tensor_parallel.layers import mask_padded_vocab
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(12, 3, 16, generator=gen), torch.randn(64, 16, generator=gen)  # 60 real + 4 padding
    target = torch.randint(0, 60, (12, 3), generator=gen)
    mask = (torch.rand(12, 3, generator=gen) > 0.3).float()
    upstream_grad = mask * 0.1 if upstream == "masked_mean" else torch.rand(12, 3, generator=gen)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = vocab_parallel_cross_entropy(mask_padded_vocab(xr @ wr.t(), 0, 60), target)  # no groups yet: TP 1
    ref.backward(upstream_grad)

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = ps.get_tensor_model_parallel_rank()
    xs, ws = x.clone().requires_grad_(), weight[32 * rank:32 * (rank + 1)].clone().requires_grad_()
    loss = linear_cross_entropy(xs, ws, target, vocab_start=32 * rank, vocab_size=60, grad_weights=mask, chunk_tokens=7,
                                tp_group=ps.get_process_groups().tp)
    loss.backward(upstream_grad)
    grad_x = xs.grad.clone()
    collectives.all_reduce(grad_x, ps.get_tensor_model_parallel_group())  # what copy_to_tp's backward does
    torch.testing.assert_close(loss.detach(), ref.detach(), **LOGITS_TOL)
    torch.testing.assert_close(grad_x, xr.grad, **GRAD_TOL)
    torch.testing.assert_close(ws.grad, wr.grad[32 * rank:32 * (rank + 1)], **GRAD_TOL)
    return float((ws.grad - wr.grad[32 * rank:32 * (rank + 1)]).abs().max())


@pytest.mark.parametrize("upstream", ["masked_mean", "arbitrary"])
def test_fused_cross_entropy_tp2_both_backward_paths(upstream):
    run_distributed(_fused_cross_entropy_tp2, 2, upstream=upstream)
