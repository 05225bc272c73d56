"""Compute time: the logs' FLOP count, split into GEMMs, each at a rate that depends on its size.

FLOPs: logging.num_floating_point_operations (Megatron-LM's formula from Narayanan et al. 2021, with GQA
and SwiGLU) is what the training log turns into TFLOP/s and MFU; the planner divides the same total by
the ranks and splits it over the GEMMs a rank runs per micro-batch (QKV, attention scores and values,
projection, MLP, logits), because small GEMMs run far below peak: each GEMM of M x N x K runs at
  rate(M, N, K) = peak x eff_max x prod_d d / (d + half_dim)      (preset), or
  rate = the measured rate at the GEMM's size (cube root of M N K), log-interpolated (calibrated profile).
Backward is two GEMMs per forward GEMM (data and weight gradients); full recompute adds a forward, selective
recompute the attention core's forward (recompute FLOPs are not model FLOPs, so they cost time but do not
count in TFLOP/s or MFU, as in the logs).
Element-wise work (norms, activations, dropout, residuals, softmax) is memory-bound: modelled as reading
and writing each saved activation byte three times (forward write, backward read, gradient write) at the
device's memory bandwidth.
Fixed host cost (calibrated cpu profile; 0 on GPU presets): hw.layer_overhead_s per layer and
hw.microbatch_overhead_s per micro-batch (half with the embedding, half with the output layer), forward +
backward split 1 : 2 -- eager PyTorch's per-op cost, larger than the arithmetic at small sizes. The
calibrated profile also scales a layer's arithmetic by what a real layer measured against this prediction
(hw.layer_scale_table: tall-skinny and transposed GEMMs run below the square GEMMs' rate).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import replace
from typing import TYPE_CHECKING

from megatron_lite.planner.activations import ModelShape, layer_bytes
from megatron_lite.planner.layout import Layout

if TYPE_CHECKING:  # annotations only: hardware.py -> calibrate.py -> compute.py must not import back at load
    from megatron_lite.planner.hardware import Hardware


def gemm_rate(hw: Hardware, m: float, n: float, k: float) -> float:
    """FLOP/s of one M x N x K GEMM."""
    if hw.gemm_table:
        size = (m * n * k) ** (1.0 / 3.0)
        sizes = [s for s, _ in hw.gemm_table]
        i = bisect.bisect_left(sizes, size)
        if i == 0:
            return hw.gemm_table[0][1] * 1e12 * min(1.0, size / sizes[0])
        if i >= len(sizes):
            return hw.gemm_table[-1][1] * 1e12
        (s0, r0), (s1, r1) = hw.gemm_table[i - 1], hw.gemm_table[i]
        w = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return math.exp(math.log(r0) * (1 - w) + math.log(r1) * w) * 1e12
    eff = hw.eff_max
    for d in (m, n, k):
        eff *= d / (d + hw.half_dim)
    return hw.peak_tflops * 1e12 * eff


def layer_gemms(shape: ModelShape, layout: Layout) -> list[tuple[float, float, float, int]]:
    """(M, N, K, count) of one layer's forward GEMMs on one rank for one micro-batch."""
    t = layout.tp
    tokens = layout.mbs * shape.seq / layout.cp
    hq = shape.heads * shape.head_dim
    qkv = hq + 2 * shape.groups * shape.head_dim
    ffn_in = shape.ffn * (2 if shape.swiglu else 1)
    heads_local = max(1, shape.heads // t)
    seq_local = shape.seq / layout.cp
    gemms = [(tokens, qkv / t, shape.hidden, 1), (tokens, shape.hidden, hq / t, 1),
             # scores and values, per head (batched): causal halves neither in the FLOP formula nor here
             (seq_local, shape.seq, shape.head_dim, 2 * heads_local * layout.mbs)]
    dense = 1.0 - (shape.moe_fraction if shape.num_experts else 0.0)
    if dense:
        gemms += [(tokens, ffn_in / t, shape.hidden, dense), (tokens, shape.hidden, shape.ffn / t, dense)]
    if shape.num_experts:
        # MoE layers (a moe_fraction of them): topk x the tokens through experts of moe_ffn (balanced
        # routing), the router, and the shared expert if any
        moe, k, glu = shape.moe_fraction, shape.topk, 2 if shape.swiglu else 1
        gemms += [(tokens * k, glu * shape.moe_ffn / t, shape.hidden, moe),
                  (tokens * k, shape.hidden, shape.moe_ffn / t, moe),
                  (tokens, shape.num_experts, shape.hidden, moe)]
        if shape.shared_ffn:
            gemms += [(tokens, glu * shape.shared_ffn / t, shape.hidden, moe),
                      (tokens, shape.hidden, shape.shared_ffn / t, moe)]
    return gemms


def _gemm_seconds(hw: Hardware, gemms) -> float:
    return sum(count * 2 * m * n * k / gemm_rate(hw, m, n, k) for m, n, k, count in gemms)


def _layer_terms(shape: ModelShape, layout: Layout, hw: Hardware) -> tuple[float, float, float]:
    """(forward GEMM seconds, the attention core's share of them, element-wise seconds of forward +
    backward) of one layer, before the layer scale."""
    gemms = layer_gemms(shape, layout)
    elementwise = 3 * layer_bytes(shape, replace(layout, recompute="none"), layout.mbs) \
        / (hw.memory_bandwidth_gbps * 1e9)
    return _gemm_seconds(hw, gemms), _gemm_seconds(hw, gemms[2:3]), elementwise


def layer_arithmetic(shape: ModelShape, layout: Layout, hw: Hardware) -> float:
    """Predicted arithmetic seconds of one layer's forward + backward (GEMMs and element-wise work, no fixed
    cost, no recompute, no layer scale): what calibrate.layer_scale_table compares real layers with."""
    gemm, _, elementwise = _layer_terms(shape, layout, hw)
    return 3 * gemm + elementwise


def layer_scale(hw: Hardware, arithmetic: float) -> float:
    """Real / predicted arithmetic of a layer (calibrated cpu profile; 1 elsewhere), log-interpolated in the
    predicted seconds between the table's points, the ends held outside them."""
    table = hw.layer_scale_table
    if not table:
        return 1.0
    if arithmetic <= table[0][0]:
        return table[0][1]
    if arithmetic >= table[-1][0]:
        return table[-1][1]
    i = bisect.bisect_left([t for t, _ in table], arithmetic)
    (t0, r0), (t1, r1) = table[i - 1], table[i]
    w = (math.log(arithmetic) - math.log(t0)) / (math.log(t1) - math.log(t0))
    return r0 * (1 - w) + r1 * w


def chunk_times(shape: ModelShape, layout: Layout, hw: Hardware, layers: int, first: bool,
                last: bool) -> tuple[float, float, float]:
    """(forward, backward, weight) compute seconds of one model chunk for one micro-batch: weight is the part
    of backward that zero-bubble schedules defer to W (the linear layers' weight-gradient GEMMs, one per
    forward GEMM but the attention core's, which has no weights); backward includes it."""
    gemm, core, elementwise = _layer_terms(shape, layout, hw)
    scale = layer_scale(hw, 3 * gemm + elementwise) if hw.layer_scale_table else 1.0
    fwd_layer, core, elementwise = scale * gemm, scale * core, scale * elementwise
    weight = layers * (fwd_layer - core)
    overhead = hw.layer_overhead_s / 3  # the fixed per-op host cost, forward : backward = 1 : 2
    forward = layers * (fwd_layer + elementwise / 3 + overhead)
    backward = layers * (2 * fwd_layer + 2 * elementwise / 3 + 2 * overhead)
    if layout.recompute == "full":
        backward += layers * (fwd_layer + elementwise / 3 + overhead)
    elif layout.recompute == "selective":
        backward += layers * core
    # the micro-batch's fixed cost: half the embedding's (first chunk), half the output layer's and loss's
    ends = (0.5 if first else 0.0) + (0.5 if last else 0.0)
    forward += ends * hw.microbatch_overhead_s / 3
    backward += ends * 2 * hw.microbatch_overhead_s / 3
    if last:
        tokens = layout.mbs * shape.seq / layout.cp
        logits = _gemm_seconds(hw, [(tokens, shape.vocab / layout.tp, shape.hidden, 1)])
        forward += logits
        backward += 2 * logits
        weight += logits
    return forward, backward, weight


def optimizer_seconds(hw: Hardware, local_params: float, strategy: str, dp: int) -> float:
    """The optimizer step, memory-bound: fp32 main param, two moments and the gradient read and written,
    the model param written (~36 bytes per parameter this rank updates)."""
    shard = local_params / dp if strategy != "no_shard" else local_params
    return 36 * shard / (hw.memory_bandwidth_gbps * 1e9)
