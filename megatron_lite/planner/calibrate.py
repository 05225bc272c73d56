"""Measure this machine for the `cpu` profile: GEMM rate by size, memory bandwidth, collective latency and
bandwidth per group size, and p2p, with gloo -- in the conditions a CPU run has (one thread per rank, all
ranks of the node running at once).

GEMM: square-ish fp32 GEMMs of sizes 16..512 on one thread; the table maps the cube root of M N K to
TFLOP/s (compute.gemm_rate interpolates). Memory bandwidth: a large tensor copy. Collectives: `world`
gloo processes (testing.run_distributed), split into world / n groups of n ranks that all-reduce at the
same time (as TP or DP groups of a real layout do), two message sizes -> latency per ring step and bus
bandwidth by fitting t = 2 (n-1) alpha + 2 (n-1)/n B / bw. p2p: pairs sending at once, the same fit; and
the pipeline's hop the same way over the transport a run uses (shared memory on one host: pipeline_p2p).
Framework overheads: forward + backward of the real GPTModel (one process, one thread) at a size whose
arithmetic is negligible (hidden 32, 16 tokens), with 1 and 5 layers: the difference / 4 is the fixed cost
of one layer, the rest of the 1-layer time that of a micro-batch's embedding, output layer and loss (at
the planner's small GPTs these per-op costs are most of the compute time). Layer scale: the same model at
hidden 64-256 (1 and 3 layers) against the GEMM table's prediction of its arithmetic (layer_scale_table).
Step overheads: a full training.train_step of the tiny GPT (1 and 5 layers) less its forward + backward:
the optimizer's, DDP's and the step's bookkeeping per step and per layer (step_overheads).
`compute_units_per_node` = the CPUs this process may use. Every timing is the fastest of a few repeats.
"""
from __future__ import annotations

import os
import time

SIZES = (16, 32, 64, 128, 256, 512)


def _best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls: preemption on a shared machine only ever adds time, so the
    minimum is the machine's own speed (a median let one busy moment put 50 ms into a 2-rank all-reduce's
    latency; on a quiet machine the two agree)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_table(quick: bool) -> list[tuple[float, float]]:
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = []
        for n in SIZES:
            a, b = torch.randn(n, n), torch.randn(n, n)
            inner = max(1, int(2e7 / (2 * n ** 3)))

            def run():
                for _ in range(inner):
                    a @ b
            run()
            seconds = _best_time(run, 3 if quick else 7) / inner
            table.append((float(n), 2 * n ** 3 / seconds / 1e12))
        return table
    finally:
        torch.set_num_threads(threads)


def _tiny_config(layers: int, hidden: int, seq: int, heads: int):
    """The calibration's GPT: vocabulary 64, no dropout, one sequence per step (not yet validated)."""
    from megatron_lite.config import Config
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = layers, hidden, heads, seq, 64
    m.hidden_dropout = m.attention_dropout = 0.0
    cfg.training.micro_batch_size = cfg.training.global_batch_size = 1
    return cfg


def _layer_step_time(layers: int, hidden: int, seq: int, heads: int, repeats: int) -> float:
    """Fastest forward + backward of the real GPTModel (one process, one thread, micro-batch 1)."""
    import torch
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.process_groups import ProcessGroups
    model = GPTModel(_tiny_config(layers, hidden, seq, heads).validate(), pre_process=True, post_process=True,
                     layer_numbers=list(range(1, layers + 1)), groups=ProcessGroups.single())
    tokens, positions, mask = torch.randint(0, 64, (1, seq)), torch.arange(seq)[None], torch.ones(1, seq)

    def step():
        model(tokens, positions, None, labels=tokens, loss_mask=mask).float().mean().backward()
    step()
    return _best_time(step, repeats)


def framework_overheads(repeats: int = 15) -> tuple[float, float]:
    """(seconds per layer, seconds per micro-batch) of fixed forward + backward cost (see the docstring)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, five = (_layer_step_time(layers, 32, 16, 2, repeats) for layers in (1, 5))
        per_layer = max(0.0, (five - one) / 4)
        return per_layer, max(0.0, one - per_layer)
    finally:
        torch.set_num_threads(threads)


def _tiny_step_worker(layers: int, repeats: int) -> float:
    """Fastest full training step (training.train_step: forward and backward of one micro-batch, DDP's
    gradient finish, the optimizer, clipping, the scheduler) of the tiny GPT on one process, no groups."""
    import torch
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.process_groups import ProcessGroups
    from megatron_lite.training import setup_model_and_optimizer, train_step
    cfg = _tiny_config(layers, 32, 16, 2)
    cfg.training.train_iters = 1000
    cfg = cfg.validate()
    groups = ProcessGroups.single()

    def provider(pre_process, post_process, layer_numbers):
        return GPTModel(cfg, pre_process=pre_process, post_process=post_process, layer_numbers=layer_numbers,
                        groups=groups)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, provider, groups)
    tokens, positions, mask = torch.randint(0, 64, (1, 16)), torch.arange(16)[None], torch.ones(1, 16)

    def forward_step(data_iterator, chunk):
        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}
        return chunk(tokens, positions, None, labels=tokens, loss_mask=mask), loss_func

    def step():
        train_step(cfg, forward_step, [iter(())], model, optimizer, scheduler, 1, 1, groups)
    step()
    return _best_time(step, repeats)


def step_overheads(per_layer: float, per_microbatch: float, repeats: int = 15) -> tuple[float, float]:
    """(seconds per step, seconds per layer per step) of the training step's fixed cost outside forward and
    backward -- DDP's gradient finish, the optimizer's per-tensor work, clipping, the scheduler, the loss
    bookkeeping -- a full train_step of the tiny GPT with 1 and 5 layers less its forward + backward
    (framework_overheads' per_layer and per_microbatch). On a shared CPU every rank pays it each step."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, five = (_tiny_step_worker(layers, repeats) for layers in (1, 5))
        per_step_layer = max(0.0, (five - one) / 4 - per_layer)
        return max(0.0, one - per_step_layer - per_layer - per_microbatch), per_step_layer
    finally:
        torch.set_num_threads(threads)


LAYER_SIZES = ((64, 32, 4), (128, 64, 8), (256, 128, 8))  # (hidden, seq, heads) of the layer-scale table


def layer_scale_table(profile: dict, repeats: int = 7) -> list[list[float]]:
    """[(predicted arithmetic seconds of one layer's forward + backward, measured / predicted)] at
    LAYER_SIZES: a real layer's GEMMs (tall-skinny, transposed in backward) and element-wise ops run
    slower than the square GEMMs and the large copy of the table predict -- 1.2-1.8x at hidden 128-256 on
    a 2-core x86 (measured 2026-12-02). The arithmetic measured is the layer's time (3 layers minus 1, / 2)
    less the calibrated per-layer overhead; compute.chunk_times scales its arithmetic by the ratio,
    log-interpolated in the predicted time (the ends held outside the table)."""
    from types import SimpleNamespace

    import torch
    from megatron_lite.planner.activations import ModelShape
    from megatron_lite.planner.compute import layer_arithmetic
    from megatron_lite.planner.layout import Layout, prepare
    # the profile being measured, as the fields layer_arithmetic reads: its GEMM table (which replaces the
    # presets' eff_max / half_dim model) and bandwidth. Not hardware.Hardware: hardware.py calls this
    # module (cpu_profile), and the import-cycle check counts a function-level import back as a cycle.
    hw = SimpleNamespace(gemm_table=tuple(tuple(x) for x in profile["gemm_table"]),
                         peak_tflops=profile["peak_tflops"], memory_bandwidth_gbps=profile["memory_bandwidth_gbps"],
                         layer_overhead_s=profile["layer_overhead_s"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = []
        for hidden, seq, heads in LAYER_SIZES:
            one, three = (_layer_step_time(layers, hidden, seq, heads, repeats) for layers in (1, 3))
            measured = max(1e-9, (three - one) / 2 - hw.layer_overhead_s)
            cfg = prepare(_tiny_config(1, hidden, seq, heads))
            predicted = layer_arithmetic(ModelShape.of(cfg, 1), Layout(), hw)
            table.append([predicted, max(0.5, measured / predicted)])
        return sorted(table)
    finally:
        torch.set_num_threads(threads)


def memory_bandwidth() -> float:
    import torch
    x = torch.empty(8 << 20)
    y = torch.empty_like(x)
    seconds = _best_time(lambda: y.copy_(x), 5)
    return 2 * x.numel() * 4 / seconds / 1e9


def _collective_worker(sizes: tuple, group_sizes: tuple, repeats: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron_lite import collectives
    from megatron_lite.process_groups import Group, ProcessGroups
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for n in group_sizes:
        mine = None
        for start in range(0, world, n):
            ranks = list(range(start, start + n))
            handle = dist.new_group(ranks)
            if rank in ranks:
                mine = Group(f"cal{n}", tuple(ranks), ranks.index(rank), handle)
        collectives.barrier()  # every group starts together, as in a run
        out[n] = [time_all_reduce(torch.zeros(nbytes // 4), mine, repeats) for nbytes in sizes]
    # p2p: even ranks send to the next odd rank, all pairs at once
    peer = rank + 1 if rank % 2 == 0 else rank - 1
    out["p2p"] = [time_exchange(torch.zeros(nbytes // 4), rank % 2 == 0, peer, repeats) for nbytes in sizes]
    # the pipeline's hop as a CPU run makes it (shared memory between ranks of one host), the same pairs
    handles = {start: dist.new_group([start, start + 1]) for start in range(0, world - 1, 2)}
    first = rank - rank % 2
    pair = ProcessGroups.single(rank).replace(pp=Group("pp", (first, first + 1), rank % 2, handles[first]))
    out["pipeline_p2p"] = [time_pipeline_hop(nbytes, pair, repeats) for nbytes in sizes]
    return out


def time_pipeline_hop(nbytes: int, groups, repeats: int) -> float:
    """Fastest seconds of one pipeline hop of nbytes between the two ranks of groups.pp: half a round trip
    (a send returns before its receiver has the data, so one direction alone times only the copy), over
    the transport --pipeline-p2p-transport auto picks."""
    import torch
    from megatron_lite.pipeline import p2p, shm_p2p
    shape = (nbytes // 4,)
    kw = dict(shape=shape, dtype=torch.float32, device=torch.device("cpu"), groups=groups,
              transport=shm_p2p.connect(groups, shape, torch.float32, torch.device("cpu"), "auto"))
    tensor, peer, first = torch.zeros(shape), 1 - groups.pp.rank, groups.pp.rank == 0

    def round_trip():
        for kind in (("send", "recv") if first else ("recv", "send")):
            direction = "act" if (kind == "send") == first else "grad"
            p2p.post_ops([(kind, tensor if kind == "send" else None, peer, direction)], **kw).wait(kind)
    round_trip()
    return _best_time(round_trip, repeats) / 2


def time_all_reduce(tensor, group, repeats: int) -> float:
    """Fastest seconds of an all-reduce of `tensor` over `group` (after one warm-up)."""
    from megatron_lite import collectives
    collectives.all_reduce(tensor, group=group)
    return _best_time(lambda: collectives.all_reduce(tensor, group=group), repeats)


def time_exchange(tensor, sender: bool, peer: int, repeats: int) -> float:
    """Fastest seconds of sending `tensor` to (or receiving it from) `peer`."""
    from megatron_lite import collectives

    def exchange():
        if sender:
            collectives.send(tensor, peer)
        else:
            collectives.recv(tensor, peer)
    exchange()
    return _best_time(exchange, repeats)


def _fit(small: float, large: float, sizes: tuple, volume_factor: float, steps: int) -> tuple[float, float]:
    """(latency per step, GB/s) from two (bytes, seconds) points of t = steps a + volume_factor B / bw."""
    (b0, b1) = sizes
    slope = max(1e-15, (large - small) / (b1 - b0))
    bandwidth = volume_factor / slope / 1e9
    latency = max(0.0, (small - slope * b0) / max(1, steps))
    return latency, bandwidth


def collective_tables(world: int, quick: bool) -> tuple[dict, tuple, tuple]:
    """(per group size: (latency per ring step, bus GB/s)), gloo p2p (latency, GB/s), pipeline hop (same)."""
    from megatron_lite.testing import run_distributed
    sizes = (4096, 4 << 20)
    group_sizes = tuple(n for n in (2, 4, 8) if n <= world and world % n == 0)
    results = run_distributed(_collective_worker, world, timeout=300, sizes=sizes, group_sizes=group_sizes,
                              repeats=5 if quick else 9)
    table = {}
    for n in group_sizes:
        times = [max(r[n][i] for r in results) for i in range(len(sizes))]
        table[str(n)] = _fit(times[0], times[1], sizes, 2 * (n - 1) / n, 2 * (n - 1))
    p2p_times = [max(r["p2p"][i] for r in results) for i in range(len(sizes))]
    hop_times = [max(r["pipeline_p2p"][i] for r in results) for i in range(len(sizes))]
    return table, _fit(p2p_times[0], p2p_times[1], sizes, 1.0, 1), _fit(hop_times[0], hop_times[1], sizes, 1.0, 1)


def calibrate(quick: bool = False, world: int = 8) -> dict:
    """The profile of this machine (the `cpu` preset), as hardware.Hardware's JSON fields."""
    table = gemm_table(quick)
    layer_overhead, microbatch_overhead = framework_overheads(7 if quick else 15)
    step_overhead, step_layer_overhead = step_overheads(layer_overhead, microbatch_overhead, 7 if quick else 15)
    bandwidth = memory_bandwidth()
    collectives_table, p2p, pipeline_p2p = collective_tables(world, quick)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    link = collectives_table[max(collectives_table, key=int)][1]
    profile = dict(name="cpu", peak_tflops=max(r for _, r in table), memory_gb=memory_gb,
                   memory_bandwidth_gbps=bandwidth, intra_node_bandwidth_gbps=link, inter_node_bandwidth_gbps=link,
                   gemm_table=[list(x) for x in table], collective_table=collectives_table, p2p=list(p2p),
                   pipeline_p2p=list(pipeline_p2p),
                   compute_units_per_node=cores, layer_overhead_s=layer_overhead, microbatch_overhead_s=microbatch_overhead,
                   step_overhead_s=step_overhead, step_layer_overhead_s=step_layer_overhead)
    profile["layer_scale_table"] = layer_scale_table(profile, 5 if quick else 9)
    return profile
