"""Model FLOPs per iteration (logging.num_floating_point_operations) against a hand count of every matmul,
and MFU against that count, with activation recomputation not counted (model FLOPs, not hardware FLOPs)."""
from __future__ import annotations

import pytest

from megatron_lite.config import Config
from megatron_lite.logging import MetricsLogger, num_floating_point_operations, padded_vocab_size


def _config(**model: object) -> Config:
    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg.validate()


def hand_count(cfg: Config, batch: int) -> int:
    """Sum over every matmul of 2 x m x n x k, forward only, then x3 for forward + backward (backward does
    two matmuls per forward matmul: grad wrt input and grad wrt weight)."""
    m = cfg.model
    s, h, d = m.seq_length, m.hidden_size, m.head_dim
    heads, groups, ffn = m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    vocab = padded_vocab_size(cfg)
    per_layer = {
        "qkv": 2 * s * h * (heads * d + 2 * groups * d),  # queries for every head, one key/value per group
        "scores": 2 * heads * s * s * d,                   # q k^T (full s x s, as Megatron counts it)
        "values": 2 * heads * s * s * d,                   # probs v
        "proj": 2 * s * (heads * d) * h,
        "fc1": 2 * s * h * (2 * ffn if m.swiglu else ffn),  # SwiGLU: gate and up projections
        "fc2": 2 * s * ffn * h,
    }
    logits = 2 * s * h * vocab
    forward = batch * (m.num_layers * sum(per_layer.values()) + logits)
    return 3 * forward


GPT2_XL = dict(num_layers=48, hidden_size=1600, num_attention_heads=25, seq_length=1024, vocab_size=50257)
LLAMA3_8B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, group_query_attention=True,
                 num_query_groups=8, ffn_hidden_size=14336, swiglu=True, seq_length=8192, vocab_size=128256,
                 position_embedding_type="rope", normalization="RMSNorm", add_bias_linear=False)
TINY_GQA = dict(num_layers=3, hidden_size=96, num_attention_heads=6, group_query_attention=True, num_query_groups=2,
                kv_channels=24, swiglu=True, ffn_hidden_size=200, seq_length=40, vocab_size=1000)  # heads*d != hidden


@pytest.mark.parametrize("shape", [GPT2_XL, LLAMA3_8B, TINY_GQA], ids=["gpt2-xl", "llama3-8b", "tiny-gqa-kv-channels"])
def test_flops_match_hand_count(shape: dict) -> None:
    cfg = _config(**shape)
    for batch in (1, 8):
        assert num_floating_point_operations(cfg, batch) == pytest.approx(hand_count(cfg, batch), rel=1e-12)


def test_gpt_matches_the_paper_formula() -> None:
    """Narayanan et al. 2021, eq. 3: 96 B s l h^2 (1 + s/6h + V/16lh) counts a recompute forward (4 passes
    through the layers, 3 through the logits); model FLOPs drop it: 72 B s l h^2 (1 + s/6h) + 6 B s h V."""
    cfg = _config(**GPT2_XL)
    b, s, l, h, v = 8, 1024, 48, 1600, padded_vocab_size(cfg)
    paper_with_recompute = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    model_flops = 72 * b * s * l * h * h * (1 + s / (6 * h)) + 6 * b * s * h * v
    assert num_floating_point_operations(cfg, b) == pytest.approx(model_flops, rel=1e-12)
    # The paper's extra term is one more forward through the layers: a third of what the code counts per
    # layer (forward + backward), times the layers. The code's per-layer count is the difference that one
    # more layer makes, so this ties the paper's recompute term to the code, not to the test's formulas.
    per_layer = num_floating_point_operations(_config(**dict(GPT2_XL, num_layers=49)), b) - model_flops
    assert paper_with_recompute == pytest.approx(num_floating_point_operations(cfg, b) + l * per_layer / 3, rel=1e-12)


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_mfu_uses_model_flops_without_recompute(recompute: str | None) -> None:
    shape = dict(GPT2_XL, recompute_granularity=recompute, recompute_method="uniform" if recompute == "full" else None)
    cfg = _config(**shape)
    cfg.logging.peak_tflops = 989.0
    cfg.logging.log_memory = False
    logger = MetricsLogger(cfg, world_size=8)
    record = logger.log_training(iteration=1, train_iters=10, consumed_samples=64, lm_loss=1.0, learning_rate=1e-4,
                                 global_batch_size=64, grad_norm=1.0, num_zeros=None, loss_scale=1.0, skipped=0,
                                 nan_iterations=0, elapsed_per_iteration_s=2.0)
    expected_tflops = hand_count(cfg, 64) / 2.0 / 8 / 1e12  # per device
    assert record["tflops_per_device"] == pytest.approx(expected_tflops, rel=1e-12)
    assert record["mfu"] == pytest.approx(expected_tflops / 989.0, rel=1e-12)


def test_moe_flops_count_active_parameters_router_and_shared_expert() -> None:
    """A MoE layer's MLP FLOPs are those of top-k experts of --moe-ffn-hidden-size, the shared expert with its
    gate and the router GEMM (hand count per token), and dense layers (--moe-layer-freq) keep the dense MLP's."""
    cfg = _config(**TINY_GQA, add_bias_linear=False)
    cfg.moe.num_experts, cfg.moe.moe_router_topk, cfg.moe.moe_ffn_hidden_size = 8, 2, 64
    cfg.moe.moe_shared_expert_intermediate_size, cfg.moe.moe_shared_expert_gate = 96, True
    cfg.moe.moe_layer_freq = "[0,1,1]"
    cfg.validate()
    m, s, h = cfg.model, cfg.model.seq_length, cfg.model.hidden_size
    dense_mlp = 3 * 2 * s * h * (2 * m.ffn_hidden_size + m.ffn_hidden_size)  # fwd + bwd, SwiGLU fc1 + fc2
    moe_mlp = 3 * 2 * s * h * (2 * (2 * 64 + 64) + (2 * 96 + 96) + 8 + 1)  # 2 experts, shared, router, gate
    expected = hand_count(_config(**TINY_GQA, add_bias_linear=False), 2) + 2 * 2 * (moe_mlp - dense_mlp)
    assert num_floating_point_operations(cfg, 2) == pytest.approx(expected, rel=1e-12)
