"""Step time of one layout: compute, TP/SP/CP/EP communication, exposed DP communication, the bubble.

Per micro-batch and model chunk, forward f and backward b are compute (compute.py) plus the layer
communication on the critical path (not overlapped, as in Megatron's defaults):
  TP (Megatron, Shoeybi et al. 2019; with SP, Korthikanti et al. 2022): per layer 2 all-reduces forward
     and 2 backward of the [s, b, h] activation (with SP: all-gathers and reduce-scatters of the same
     total volume), plus the forward's again under full recompute;
  CP (ring attention, context_parallel/ring.py): per layer (CP-1) exchanges of the local K and V forward,
     twice that backward (K, V and their gradients);
  EP (models/moe/dispatcher.py, over the ETP x EP group): per MoE layer a dispatch and a combine -- all-to-
     alls of topk x the local tokens x h (alltoall), or an all-gather of every member's tokens and a
     reduce-scatter of the outputs (allgather, the default) -- forward, and again backward.
Each on the link its group uses (comm.py). The pipeline: the simulator (pipeline/simulator.py) runs every
rank's action list for the schedule `pipeline/auto.py` picks at this layout's F : B : W (W: the weight-
gradient part of b that ZB-H1 and ZB-V defer; compute.chunk_times) for at most 2 x PP micro-batches, and
again with PP more to extrapolate in m; its idle time, the fill and drain p2p hops and each rank's own
blocking transfers (one p2p per chunk forward and per backward: p2p is not overlapped by default) are
pipeline_bubble; the step's pipeline part is m x (f + b) summed over chunks plus that (see
pipeline_makespan).
DP: the gradient all-reduce (no_shard) or reduce-scatter (sharded strategies) of the stage's gradient
buffer (fp32 with bf16) over DP x CP, and the parameter all-gather of the distributed optimizer, one
collective per DDP bucket (each pays its latency: 45 buckets of a small GPT cost 3x its step on the cpu
profile, measured); stage r's reduce starts r chunk backwards before stage 0 finishes (1F1B's drain), and
with --overlap-grad-reduce also hides behind the stage's last backward, the all-gather behind the first
forward (--overlap-param-gather), so only the excess is exposed. ZeRO-3 gathers parameters for
every micro-batch's forward and backward (megatron-core's optim_grads_params), hidden behind that compute.
A shared CPU (the cpu profile: more ranks than cores) runs at most `compute_units` ranks at once: compute
and the pipeline's idle time (waiting ranks poll) stretch by ranks / cores. Compute there includes the
framework's calibrated fixed cost per layer and micro-batch (compute.py), most of a small GPT's time, and
optimizer_step the step's calibrated host cost outside forward and backward (per step and per layer).
"""
from __future__ import annotations

import functools

from megatron_lite.planner.comm import collective_time, group_span, p2p_time
from megatron_lite.planner.activations import ModelShape, rank_actions, simulated_microbatches
from megatron_lite.planner.compute import chunk_times, optimizer_seconds
from megatron_lite.planner.hardware import Hardware
from megatron_lite.planner.layout import Layout


def layer_comm(shape: ModelShape, layout: Layout, hw: Hardware, gpus_per_node: int) -> dict:
    """Per layer and micro-batch: (forward, backward) seconds of TP, CP and EP communication."""
    tokens = layout.mbs * shape.seq / layout.cp
    act = tokens * shape.hidden * shape.e
    out = {}
    t_nodes = group_span(layout, ("tp",), gpus_per_node)
    one = collective_time(hw, "all_reduce", act, layout.tp, t_nodes)
    fwd = 2 * one
    bwd = 2 * one + (fwd if layout.recompute == "full" else 0.0)
    out["tp"] = (fwd, bwd)
    kv = tokens * 2 * shape.groups * shape.head_dim / layout.tp * shape.e
    cp_nodes = group_span(layout, ("cp",), gpus_per_node)
    step = p2p_time(hw, kv, cp_nodes > 1) if layout.cp > 1 else 0.0
    out["cp"] = ((layout.cp - 1) * step, 2 * (layout.cp - 1) * step)
    group = layout.tp * layout.ep  # the dispatchers' ETP x EP group (expert TP = TP)
    if shape.num_experts and group > 1:
        nodes = group_span(layout, ("tp", "ep") if layout.ep > 1 else ("tp",), gpus_per_node)
        local = act / (layout.tp if layout.sp else 1)  # each rank routes its own (SP) tokens
        if shape.dispatcher == "alltoall":
            one = collective_time(hw, "all_to_all", local * shape.topk, group, nodes)
        else:  # allgather: gather every member's tokens, reduce-scatter the outputs back
            one = collective_time(hw, "all_gather", local * group, group, nodes) / 2 \
                + collective_time(hw, "reduce_scatter", local * group, group, nodes) / 2
        per_layer = 2 * one * shape.moe_fraction  # dispatch and combine
        out["ep"] = (per_layer, per_layer)
    else:
        out["ep"] = (0.0, 0.0)
    return out


SPLIT_BACKWARD = ("zb-h1", "zbv")  # schedules that run a backward as B, then its W later


def _ratio(x: float) -> float:
    """x to two significant digits: the simulations are cached per cost ratio, and a 1,024-GPU search asks
    for thousands of nearly equal ones."""
    return float(f"{x:.2g}")


@functools.lru_cache(maxsize=8192)
def unit_idle(schedule: str, pp: int, vp: int, m_sim: int, backward: float, weight: float) -> float:
    """Idle time of the busiest rank in units of one chunk's forward, simulated with F = 1, a backward of
    `backward` of which `weight` is W (a split backward's deferred weight gradients: B = backward - weight)."""
    from megatron_lite.pipeline.simulator import simulate_timeline
    schedules = [list(rank_actions(schedule, pp, vp, m_sim, r)) for r in range(pp)]
    timeline = simulate_timeline(schedules, 1.0, backward, weight_time=weight)
    return timeline.step_time - max(timeline.busy)


def pipeline_makespan(schedule: str, pp: int, vp: int, m: int, f: float, b: float, p2p: float,
                      w: float = 0.0) -> float:
    """The pipeline part of the step, f and b per chunk and micro-batch (w of b the weight-gradient part a
    zero-bubble schedule defers to W): m x vp x (f + b) of work plus the simulated idle time of the
    schedule (at most simulated_microbatches micro-batches simulated, at these F : B : W ratios -- cached
    per schedule shape and ratio), plus the p2p transfers of the fill and the drain (2 (PP - 1) x vp hops,
    each p2p; step_time adds each rank's own blocking transfers to f and b)."""
    if pp == 1 or f <= 0:
        return m * vp * (f + b)
    weight = _ratio(w / f) if schedule in SPLIT_BACKWARD else 0.0
    m_sim = simulated_microbatches(pp, m)
    idle = unit_idle(schedule, pp, vp, m_sim, _ratio(b / f), weight)
    if m > m_sim:
        # past the warm-up the idle time grows linearly in m (by 0 when the steady state is balanced, as
        # 1F1B's is; ZB-V's is only at F = B = W): extrapolate from one more round of PP micro-batches
        more = unit_idle(schedule, pp, vp, m_sim + pp, _ratio(b / f), weight)
        idle += (m - m_sim) * (more - idle) / pp
    idle *= f
    return m * vp * (f + b) + idle + 2 * (pp - 1) * vp * p2p


def dp_comm(hw: Hardware, layout: Layout, stages: list, e: int, backward_window: float, drain: float,
            forward_window: float, m: int, gpus_per_node: int) -> float:
    """Exposed seconds of data-parallel communication per step: the worst over `stages` ((pp_rank,
    parameters, DDP buckets) of each distinct stage). Each bucket is its own collective (its latency paid
    per bucket; the bytes are the stage's fp32 gradient buffer and its parameters). Stage r's reduce can
    run while the stages before it still drain the pipeline (r chunk backwards, `drain` each: 1F1B's
    order, stage 0 finishes last), and with overlap also during its own last backward (`backward_window`)."""
    n = layout.dp * layout.cp
    if n <= 1:
        return 0.0
    nodes = group_span(layout, ("dp", "cp"), gpus_per_node)
    worst = 0.0
    for pp_rank, params, buckets in stages:
        window = backward_window + pp_rank * drain
        grad_bytes, param_bytes = params * 4, params * e  # fp32 gradient buffers (with bf16 and fp32 alike)
        if layout.strategy == "no_shard":
            worst = max(worst, collective_time(hw, "all_reduce", grad_bytes, n, nodes, buckets) - window)
            continue
        reduce = collective_time(hw, "reduce_scatter", grad_bytes, n, nodes, buckets)
        gather = collective_time(hw, "all_gather", param_bytes, n, nodes, buckets)
        if layout.strategy == "optim_grads_params":
            # parameters gathered for each micro-batch's forward and again for its backward
            per_mb = max(0.0, gather - forward_window) + max(0.0, gather - backward_window)
            worst = max(worst, m * per_mb + max(0.0, reduce - window))
        else:
            worst = max(worst, max(0.0, reduce - window) + max(0.0, gather - forward_window))
    return max(0.0, worst)


def step_time(shape: ModelShape, layout: Layout, hw: Hardware, gpus_per_node: int, schedule: str,
              m: int, stages: list, overlap: bool = True) -> dict:
    """Seconds per step and its breakdown; `stages`: (pp_rank, parameters, DDP buckets) of each distinct
    pipeline stage (memory.layout_memory's stages)."""
    from megatron_lite.pipeline.layout import layers_for_stage
    c = layer_comm(shape, layout, hw, gpus_per_node)
    per_rank = []
    for r in range(layout.pp):
        comp = [0.0, 0.0, 0.0]
        for v in range(layout.vp):
            layers = len(layers_for_stage(shape.layers, layout.pp, r, layout.vp if layout.vp > 1 else None, v))
            # ZB-V's V shape: the output layer is on rank 0's second chunk
            last = (r == 0 and v == 1) if schedule == "zbv" else (r == layout.pp - 1 and v == layout.vp - 1)
            for i, seconds in enumerate(chunk_times(shape, layout, hw, layers, r == 0 and v == 0, last)):
                comp[i] += seconds
        layers = sum(len(layers_for_stage(shape.layers, layout.pp, r, layout.vp if layout.vp > 1 else None, v))
                     for v in range(layout.vp))
        per_rank.append((*comp, layers))
    f_c, b_c, w_c, layers = max(per_rank, key=lambda x: x[0] + x[1])
    shared = 1.0
    if hw.compute_units_per_node:
        shared = max(1.0, min(gpus_per_node, layout.world) / hw.compute_units_per_node)
    # layer communication runs while the other ranks compute: on a shared CPU each step of it waits for its
    # peers to be scheduled, so it stretches like compute (the calibration measured it with idle peers)
    comm_f = {k: layers * v[0] * shared for k, v in c.items()}
    comm_b = {k: layers * v[1] * shared for k, v in c.items()}
    f_total = f_c + sum(comm_f.values())
    b_total = b_c + sum(comm_b.values())
    pp_nodes = group_span(layout, ("pp",), gpus_per_node)
    act_bytes = layout.mbs * shape.seq / layout.cp * shape.hidden * shape.e / (layout.tp if layout.sp else 1)
    p2p = p2p_time(hw, act_bytes, pp_nodes > 1, pipeline=True) if layout.pp > 1 else 0.0
    vp = layout.vp
    # each chunk's forward and backward block for one activation (gradient) transfer: p2p is not
    # overlapped by default; on a shared CPU it stretches like compute (both ranks must be scheduled)
    hop = p2p * shared
    critical = pipeline_makespan(schedule, layout.pp, vp, m, f_total / vp + hop, b_total / vp + hop, p2p, w_c / vp)
    busy = m * (f_total + b_total)
    compute = m * (f_c + b_c) * shared
    work = compute + busy - m * (f_c + b_c)
    transfers = 2 * m * vp * hop
    # a waiting gloo rank polls rather than yields its core, so on a shared CPU the bubble slows down with
    # the compute (measured: interleaving's smaller bubble is faster there too)
    pipeline = work + (critical - busy - transfers) * shared + transfers
    chunk_b = b_total / vp * shared  # one chunk's backward of one micro-batch, in wall time
    dp_exposed = dp_comm(hw, layout, stages, shape.e, chunk_b if overlap else 0.0, chunk_b if layout.pp > 1 else 0.0,
                         f_total / vp * shared if overlap else 0.0, m, gpus_per_node)
    local_params = max(params for _, params, _ in stages)
    # the step's host cost outside forward and backward (calibrated cpu profile), per step and per layer
    host = hw.step_overhead_s + hw.step_layer_overhead_s * layers
    optimizer = (optimizer_seconds(hw, local_params, layout.strategy, layout.dp * layout.cp) + host) * shared
    out = {"compute": compute, "tp_comm": m * (comm_f["tp"] + comm_b["tp"]), "cp_comm": m * (comm_f["cp"] + comm_b["cp"]),
           "ep_comm": m * (comm_f["ep"] + comm_b["ep"]), "dp_comm_exposed": dp_exposed,
           "pipeline_bubble": pipeline - work, "optimizer_step": optimizer}
    out["total"] = sum(out.values())
    return out
