"""Activation memory per rank: Korthikanti et al. 2022 term by term, as this implementation stores them.

Source: V. Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (MLSys
2023, arXiv:2205.05198), Sec. 4: per layer and micro-batch, with 16-bit activations and 1-byte dropout
masks, sbh(34 + 5as/h) bytes without parallelism, sbh(10 + 24/t + 5as/(ht)) with TP t, sbh(34/t + 5as/(ht))
with TP + sequence parallelism, 34sbh/t with selective recompute (the attention core's 5as/h term is
recomputed) and 2sbh with full recompute (only each layer's input is kept).

The terms here are the same tensors, counted in elements x bytes of what torch autograd actually keeps in
this code (planner/measure.py measures exactly that, and tests/distributed/test_planner_memory.py holds
the two within 10%), with e = activation bytes (4 fp32, 2 bf16/fp16), per token of the micro-batch:
  attention: LayerNorm input h, QKV GEMM input h (gathered to the full sequence under SP), the QKV output
             (h + 2 g d)/t (q, k, v are views of it), the attention output h/t (the projection's input);
             with RoPE the rotated q and k add (h + g d)/t and the cos and sin tables 2 d_rot (not split
             by TP); without flash attention the s x s scores (softmax
             output, dropout mask and output: Korthikanti's 5as/h term) a s / t x (e, or 2e + 1 with dropout).
             torch's scaled_dot_product_attention is flash on CPU and GPU, so that term is absent unless
             attention dropout forces the math kernel: the "flash attention's missing 5as/h term"; flash
             keeps an fp32 log-sum-exp per head and token instead (a/t x 4 bytes).
  MLP:       LayerNorm input h, fc1 input h (gathered under SP), fc1 output f' = f (x2 SwiGLU), the
             activation's output f (SwiGLU keeps silu(gate) too: + f).
  dropout:   1-byte masks of h per hidden dropout (two per layer) when --hidden-dropout > 0.
Under sequence parallelism the LayerNorm inputs are h/t (Korthikanti's SP saving); this code keeps the
all-gathered GEMM inputs (Megatron re-gathers them in backward), so those stay h.
Selective recompute drops the attention core's saved tensors (its q, k, v inputs remain, as the QKV
output); full recompute keeps only each layer's input (h/t under SP), per Korthikanti.
MoE layers (the dispatcher's pairs, allgather or alltoall, and the shared expert: _moe_terms) replace the
dense MLP in a moe_fraction of the layers, with the LayerNorm output (the MoE input) kept per rank (h/t
under SP).
Context parallelism divides s by CP, and each --cp-comm-type keeps its own core terms (_qkv_terms,
_core_attention_bytes): ring attention (p2p) its fp32 output, h/t x 4 bytes; all_gather the K/V gathered
over the whole sequence (CP x 2gd/t per token) and its [l, s] mask; a2a (Ulysses) q, k, v and the output
scattered by heads over the whole sequence and its [s, s] mask, but not the QKV output. The variant is
the configuration's --cp-comm-type (ModelShape.cp_comm): the search does not choose among them.
First stage: token and position ids (int64). Last stage: final LayerNorm input and output (h, the output
is kept full-sequence by the fused output layer + cross entropy), that kernel's saved d loss/dx (h) and
d loss/dW ((V/t) x h, fp32) per micro-batch in flight (kernels/linear_cross_entropy.py); the unfused path
keeps the fp32 softmax (V/t per token) instead.
Micro-batches in flight: the peak, over the schedule's action list for each pipeline rank (pipeline/
schedules.py), of the activations of every (chunk, micro-batch) forwarded and not yet backwarded -- the
simulator's max_in_flight, weighted by what each chunk holds. With a split backward (ZB-H1, ZB-V) a
(chunk, micro-batch) trades its saved activations at B for what its deferred weight gradients keep until
its W: each linear layer's input and output gradient (layer_wgrad_bytes, peak_alive).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from megatron_lite.planner.layout import Layout


@dataclass(frozen=True)
class ModelShape:
    """What the activation and time models need of a GPT."""
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    swiglu: bool
    rope: bool
    seq: int
    vocab: int  # padded
    e: int  # activation bytes
    hidden_dropout: float
    attention_dropout: float
    num_experts: int = 0
    topk: int = 2
    fused_output: bool = True
    tied: bool = True
    rotary_dim: int = 0  # channels of each head RoPE rotates (head_dim x --rotary-percent)
    moe_fraction: float = 1.0  # share of the layers that are MoE (--moe-layer-freq)
    moe_ffn: int = 0  # each expert's MLP hidden size (--moe-ffn-hidden-size)
    shared_ffn: int = 0  # the shared expert's (--moe-shared-expert-intermediate-size), 0: none
    dispatcher: str = "allgather"
    cp_comm: str = "p2p"  # --cp-comm-type

    @classmethod
    def of(cls, cfg, tp: int = 1) -> "ModelShape":
        from megatron_lite.planner.states import _Holder
        # the holder's key is the state bytes' (no parallel fields): the CP variant is passed apart
        return _shape_of(_Holder(cfg), tp, cfg.parallel.cp_comm_type)

    @classmethod
    def build(cls, cfg, tp: int) -> "ModelShape":
        from megatron_lite.logging import padded_vocab_size
        m = cfg.model
        e = 4 if not (cfg.optimizer.bf16 or cfg.optimizer.fp16) else 2
        groups = m.num_query_groups or m.num_attention_heads
        ffn = m.ffn_hidden_size or (int((4 * m.hidden_size * 2 / 3) / 64) * 64 if m.swiglu else 4 * m.hidden_size) or 4 * m.hidden_size
        moe = cfg.moe
        experts, topk = moe.num_experts or 0, moe.moe_router_topk
        moe_fraction = sum(moe.layer_pattern(m.num_layers)) / m.num_layers if experts else 0.0
        moe_ffn = moe.moe_ffn_hidden_size or ffn
        cfg_tp = cfg.parallel.tensor_model_parallel_size
        cfg.parallel.tensor_model_parallel_size = tp
        vocab = padded_vocab_size(cfg)
        cfg.parallel.tensor_model_parallel_size = cfg_tp
        return cls(m.num_layers, m.hidden_size, m.num_attention_heads, groups, m.head_dim, ffn, m.swiglu,
                   m.position_embedding_type == "rope", m.seq_length, vocab, e, m.hidden_dropout,
                   m.attention_dropout, experts, topk, getattr(m, "cross_entropy_fusion", True),
                   not m.untie_embeddings_and_output_weights,
                   int(m.head_dim * m.rotary_percent) if m.position_embedding_type == "rope" else 0,
                   moe_fraction, moe_ffn,
                   moe.moe_shared_expert_intermediate_size or 0, moe.moe_token_dispatcher_type,
                   cfg.parallel.cp_comm_type)


@functools.lru_cache(maxsize=1024)
def _shape_of(holder, tp: int, cp_comm: str) -> ModelShape:
    return replace(ModelShape.build(holder.cfg, tp), cp_comm=cp_comm)


def layer_bytes(shape: ModelShape, layout: Layout, mbs: int) -> float:
    """Bytes one transformer layer keeps for backward for one micro-batch on one rank."""
    t, e = layout.tp, shape.e
    tokens = shape.seq // layout.cp * mbs  # this rank's tokens of the micro-batch (before the SP split)
    h = shape.hidden
    sp_div = t if layout.sp else 1
    if layout.recompute == "full":
        return tokens * h / sp_div * e
    hq = shape.heads * shape.head_dim
    attn_bytes = (h / sp_div + h + _qkv_terms(shape, layout) + hq / t) * e
    if layout.recompute != "selective":
        attn_bytes += _core_attention_bytes(shape, layout, mbs)
    mlp = h / sp_div + h + _mlp_terms(shape, shape.ffn) / t
    masks = 2 * h / sp_div if shape.hidden_dropout > 0 else 0
    if shape.num_experts:  # a moe_fraction of the layers (--moe-layer-freq) have a MoE layer instead
        moe = h / sp_div + h / sp_div + _moe_terms(shape, layout)
        mlp = (1 - shape.moe_fraction) * mlp + shape.moe_fraction * moe
    return tokens * (attn_bytes + mlp * e + masks)


def _cp_comm(shape: ModelShape, layout: Layout) -> str:
    """The context-parallel attention variant the layer runs ('' without CP)."""
    return shape.cp_comm if layout.cp > 1 else ""


def _qkv_terms(shape: ModelShape, layout: Layout) -> float:
    """Per token, in units of e: what is kept of q, k and v before the attention core. q, k, v are views of
    the QKV output (h_q + 2 g d)/t, which the core saves; with RoPE it saves the rotated q and k instead
    ((h_q + g d)/t, new tensors; v stays a view of the QKV output) and the rotation its cos and sin tables
    (2 d_rot, not split by TP). Under CP (context_parallel/attention.py, when the core is not recomputed):
    all_gather saves q and the gathered K/V (_core_attention_bytes), so of the QKV output only q's view
    (the whole QKV output; with RoPE the rotated q, h_q/t) is kept; a2a sends q, k, v through an
    all-to-all that saves nothing, so only RoPE's tables are kept. Selective recompute keeps the core's
    inputs q, k, v (torch checkpoint's inputs), as without CP."""
    t = layout.tp
    hq, kv = shape.heads * shape.head_dim, 2 * shape.groups * shape.head_dim
    rope = 2 * shape.rotary_dim if shape.rope else 0.0
    comm = _cp_comm(shape, layout) if layout.recompute != "selective" else ""
    if comm == "all_gather":
        return (hq / t if shape.rope else (hq + kv) / t) + rope
    if comm == "a2a":
        return rope
    return (hq + kv) / t + ((hq + shape.groups * shape.head_dim) / t if shape.rope else 0.0) + rope


def _core_attention_bytes(shape: ModelShape, layout: Layout, mbs: int) -> float:
    """Per token of the micro-batch, in bytes: what the attention core saves besides its inputs' storages
    (_qkv_terms) and its output (the projection's input, h_q/t). s = sequence, l = s / CP this rank's tokens.
      flash (scaled_dot_product_attention's flash kernel, CPU and GPU): an fp32 log-sum-exp per head, a/t x 4;
      ring (--cp-comm-type p2p, context_parallel/ring.py): that log-sum-exp and its fp32 output, h_q/t x 4
        (it regenerates every block's scores and dropout masks in backward);
      all_gather: the K/V gathered over the whole sequence, 2 g d / t x s per rank = CP x 2 g d / t per
        token, and the causal mask as the kernel keeps it (converted to the activation dtype, [1, 1, l, s]
        per micro-batch: s x e / mbs per token);
      a2a (Ulysses): q, k, v and the output scattered by heads over the whole sequence, per token (h_q + kv'
        + h_q)/t with kv' = 2 g d (2 h_q when the local groups do not divide by CP: replicated per head),
        and the [1, 1, s, s] mask, CP x s x e / mbs per token;
      without flash (attention dropout forces the math kernel): Korthikanti's 5as/h term, a/t x keys x
        (e, or 2e + 1 with dropout) with keys = s (the gathered keys under all_gather and a2a)."""
    t, e, s = layout.tp, shape.e, shape.seq
    hq, kv = shape.heads * shape.head_dim, 2 * shape.groups * shape.head_dim
    comm = _cp_comm(shape, layout)
    lse = shape.heads / t * 4
    if comm == "p2p":
        return lse + hq / t * 4
    out = 0.0
    if comm == "all_gather":
        out += layout.cp * kv / t * e + s * e / mbs
    elif comm == "a2a":
        kv_heads = kv if (shape.groups // t) % layout.cp == 0 else 2 * hq
        out += (hq + kv_heads + hq) / t * e + layout.cp * s * e / mbs
    if shape.attention_dropout == 0:
        return out + lse
    return out + shape.heads / t * s * (2 * e + 1)


def _mlp_terms(shape: ModelShape, f: int) -> float:
    return (2 * f + f + f) if shape.swiglu else (f + f)


def _moe_terms(shape: ModelShape, layout: Layout) -> float:
    """Per token of the sequence, in units of e, what a MoE layer keeps (models/moe/: measured per tensor
    with planner/measure.py), with k = top-k, ETP = t (each expert's MLP split like the dense one), and
    balanced routing (k pairs per token, per rank over the ETP x EP group; skewed routing keeps less on
    some ranks, more on others). The router keeps its top-k indices (int64) and probabilities (fp32) for
    this rank's tokens; a shared expert adds a dense MLP on the gathered tokens (h + its MLP terms / t).
      allgather: per pair of the gathered tokens routed here, the gathered token, the expert output and its
        routing-weighted copy (3 h), the expert MLP (/t), the token/expert indices (2 int64) and the
        routing weight (fp32).
      alltoall: per pair of this rank's tokens (k per local token, l = tokens / t under SP): its
        indices (2 int64), routing weight (fp32), the combined pair output and its weighted copy (2 h);
        per pair sent (to each of the expert's t ETP members: k t per local token) the send index (int64)
        and the returned output (h); per pair received (the same number, balanced) the regroup index
        (int64), the expert's input h, its MLP (/t) and its output h. Per token: k/t (2h + 20/e) +
        k (3 h + MLP/t + 16/e)."""
    k, t, e, h = shape.topk, layout.tp, shape.e, shape.hidden
    sp_div = t if layout.sp else 1
    router = k * (8 + 4) / e / sp_div
    expert_mlp = _mlp_terms(shape, shape.moe_ffn) / t
    if shape.dispatcher == "alltoall":
        pairs = k / sp_div * (2 * h + 20 / e) + k * t / sp_div * (3 * h + expert_mlp + 16 / e)
    else:
        pairs = k * (3 * h + expert_mlp + (16 + 4) / e)
    shared = h + _mlp_terms(shape, shape.shared_ffn) / t if shape.shared_ffn else 0.0
    return router + pairs + shared


def layer_wgrad_bytes(shape: ModelShape, layout: Layout, mbs: int) -> float:
    """Bytes one transformer layer's deferred weight gradients keep from B to W (split backward: ZB-H1,
    ZB-V) for one micro-batch: each deferred GEMM's input and output gradient (tensor_parallel/layers.py's
    DeferredWeightGrad), per token in units of e:
      linear_qkv h (its input, all-gathered under SP) + (h_q + 2 g d)/t,  linear_proj h_q/t + h (the full
      sequence, before SP's reduce-scatter),  fc1 h + f'/t (f' = 2f SwiGLU),  fc2 f/t + h;
    a MoE layer's routed experts are not deferred (plain matmuls), its shared expert is an MLP as above.
    Recompute does not change these (the recomputed forward queues the same GEMMs)."""
    t, h = layout.tp, shape.hidden
    tokens = shape.seq // layout.cp * mbs
    hq, kv = shape.heads * shape.head_dim, 2 * shape.groups * shape.head_dim
    attn = h + (hq + kv) / t + hq / t + h

    def mlp(f: int) -> float:
        return h + (2 * f if shape.swiglu else f) / t + f / t + h
    dense = mlp(shape.ffn)
    if shape.num_experts:
        shared = mlp(shape.shared_ffn) if shape.shared_ffn else 0.0
        dense = (1 - shape.moe_fraction) * dense + shape.moe_fraction * shared
    return tokens * (attn + dense) * shape.e


def first_stage_bytes(shape: ModelShape, layout: Layout, mbs: int) -> float:
    """Token and position ids, and the embedding's dropout mask."""
    tokens = shape.seq // layout.cp * mbs
    mask = tokens * shape.hidden / (layout.tp if layout.sp else 1) if shape.hidden_dropout > 0 else 0
    return tokens * 16 + mask


def last_stage_bytes(shape: ModelShape, layout: Layout, mbs: int) -> float:
    """Final norm input/output and the output layer + cross entropy."""
    tokens = shape.seq // layout.cp * mbs
    t, h, e = layout.tp, shape.hidden, shape.e
    norm = tokens * h / (t if layout.sp else 1) * e + tokens * h * e
    if shape.fused_output:
        return norm + tokens * h * e + shape.vocab / t * h * 4 + tokens * 16
    return norm + tokens * shape.vocab / t * 4 * 2 + tokens * 16


def chunk_bytes(shape: ModelShape, layout: Layout, pp_rank: int, v_shape: bool = False) -> list[float]:
    """Per model chunk on pipeline rank `pp_rank`: one micro-batch's activation bytes. v_shape (ZB-V): rank
    r holds stages r and 2PP-1-r, so the last stage (output layer, loss) is rank 0's second chunk."""
    from megatron_lite.pipeline.layout import layers_for_stage
    out = []
    vp = layout.vp
    for v in range(vp):
        layers = layers_for_stage(shape.layers, layout.pp, pp_rank, vp if vp > 1 else None, v)
        nbytes = len(layers) * layer_bytes(shape, layout, layout.mbs)
        if pp_rank == 0 and v == 0:
            nbytes += first_stage_bytes(shape, layout, layout.mbs)
        if (pp_rank == 0 and v == 1) if v_shape else (pp_rank == layout.pp - 1 and v == vp - 1):
            nbytes += last_stage_bytes(shape, layout, layout.mbs)
        out.append(nbytes)
    return out


def chunk_wgrad_bytes(shape: ModelShape, layout: Layout, pp_rank: int, v_shape: bool = False) -> list[float]:
    """Per model chunk on pipeline rank `pp_rank`: what one micro-batch's deferred weight gradients keep from
    its B to its W (layer_wgrad_bytes per layer; the unfused output layer's GEMM adds h + V/t per token)."""
    from megatron_lite.pipeline.layout import layers_for_stage
    out = []
    vp = layout.vp
    for v in range(vp):
        layers = layers_for_stage(shape.layers, layout.pp, pp_rank, vp if vp > 1 else None, v)
        nbytes = len(layers) * layer_wgrad_bytes(shape, layout, layout.mbs)
        last = (pp_rank == 0 and v == 1) if v_shape else (pp_rank == layout.pp - 1 and v == vp - 1)
        if last and not shape.fused_output:
            nbytes += shape.seq // layout.cp * layout.mbs * (shape.hidden + shape.vocab / layout.tp) * shape.e
        out.append(nbytes)
    return out


def simulated_microbatches(pp: int, m: int) -> int:
    """The peak in flight saturates once m >= PP (1F1B's warm-up is PP - 1 deep): simulate at most 2 x PP
    (keeps 1,024-GPU searches fast) while keeping m's remainder modulo PP (the interleaved groups)."""
    return m if m <= 2 * pp else 2 * pp + m % pp


@functools.lru_cache(maxsize=512)
def rank_actions(schedule: str, pp: int, vp: int, m: int, pp_rank: int) -> tuple:
    """pipeline/schedules.py's action list for one rank (cached here too, as a tuple and with more entries
    than build_schedule keeps: the search asks for many layouts' lists, and often)."""
    from megatron_lite.pipeline.schedules import build_schedule
    return tuple(build_schedule(schedule, pp, pp_rank, vp, m))


@functools.lru_cache(maxsize=4096)
def peak_alive(schedule: str, pp: int, vp: int, m: int, pp_rank: int, weights: tuple,
               wgrad_weights: tuple = ()) -> float:
    """Peak over rank pp_rank's action list of the summed weight of alive (chunk, micro-batch) pairs: alive
    from its Forward to its Backward. With a split backward (zb-h1, zbv) autograd frees the saved tensors
    at B, but the deferred weight gradients keep `wgrad_weights[chunk]` (each GEMM's input and output
    gradient: chunk_wgrad_bytes) alive until that pair's W; planner/measure.py counts the same. Within a B
    the layers trade their saved tensors for their W's one by one, so the peak is at an action boundary."""
    from megatron_lite.pipeline.actions import Backward, Forward, WeightGrad
    actions = rank_actions(schedule, pp, vp, simulated_microbatches(pp, m), pp_rank)
    alive = peak = 0.0
    for action in actions:
        if isinstance(action, Forward):
            alive += weights[action.chunk]
        elif isinstance(action, Backward):
            alive -= weights[action.chunk]
            if action.defer_wgrad:
                alive += wgrad_weights[action.chunk]
        elif isinstance(action, WeightGrad):
            alive -= wgrad_weights[action.chunk]
        peak = max(peak, alive)
    return peak


def activation_bytes(shape: ModelShape, layout: Layout, schedule: str, num_microbatches: int, pp_rank: int) -> float:
    """Peak activation bytes on pipeline rank `pp_rank` over one step of `schedule`."""
    v_shape = schedule == "zbv"
    weights = tuple(chunk_bytes(shape, layout, pp_rank, v_shape))
    wgrad = tuple(chunk_wgrad_bytes(shape, layout, pp_rank, v_shape)) if schedule in ("zb-h1", "zbv") else ()
    return peak_alive(schedule, layout.pp, layout.vp, num_microbatches, pp_rank, weights, wgrad)
