"""Pipeline bubble: measured idle fraction of every schedule, with and without --overlap-p2p-comm, beside the simulator.

Schedules: GPipe, 1F1B, interleaved 1F1B (VP 2), ZB-H1 and ZB-V (VP 2 as a V; both split each backward
evenly into B and W).

Run by hand (not a test):  python benchmarks/bench_pipeline_bubble.py [--append]

Each stage's compute is a fixed sleep (forward f, backward b = 2f per stage, split evenly over its virtual
stages), so the measurement isolates the schedule and the real p2p/runtime overhead from CPU
contention: the CI machine has 2 cores and PP = 4 runs 4 ranks. --transport picks the p2p path
(--pipeline-p2p-transport: shared memory by default, gloo with process-group, or both). Per rank, busy = wall time inside the
model's compute (the runner's stats["compute_s"]: forward_step_func with the loss, backward B, W: the sleep
plus the model's own Python and autograd work); idle fraction = 1 - busy / step time (step time = slowest
rank's wall time of forward_backward_func). Everything else (waiting for a neighbour, starting and waiting
for p2p ops, the runner's bookkeeping) is idle. Theory: the bubble is (p - 1) / (v m) of the ideal time,
i.e. (p - 1) / (v m + p - 1) of the step time, which is what the simulator (simulator.py) reproduces
exactly with free communication at the nominal times; the next column runs the simulator at the compute
times measured in the same run (mean F, B, W per chunk), the last charges every p2p op P2P_S after both
ends have posted it (blocking exchanges pay it on the critical path, overlapped ones hide it).
--append adds the table to benchmarks/RESULTS.md. --breakdown adds a second table: where each rank's idle
time goes (starting ops, waiting for receives, waiting for sends, the runner's other work), per step.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results import append_results  # noqa: E402  (benchmarks/ is the script's own folder)

from megatron_lite import collectives  # noqa: E402
from megatron_lite import parallel_state as ps  # noqa: E402
from megatron_lite.config import Config  # noqa: E402
from megatron_lite.pipeline import build_model_chunks, get_forward_backward_func  # noqa: E402
from megatron_lite.pipeline.schedules import all_rank_schedules  # noqa: E402
from megatron_lite.pipeline.simulator import simulate  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402

FORWARD_S, BACKWARD_S = 0.02, 0.04  # per pipeline stage (all its layers)
P2P_S = 0.001  # the simulator's per-op transfer cost in the second column (gloo p2p + Python, measured ~1 ms)
SEQ, HIDDEN = 4, 8


class _Sleep(torch.autograd.Function):
    """Stands for a chunk's layers: sleeps as long as their forward/backward would take."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float, wgrad_queue) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.backward_s, ctx.wgrad_queue = backward_s, wgrad_queue
        return x * 1.0

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # split backward (ZB-H1, ZB-V): B sleeps half the backward, W (queued for the runner's W action) the rest
        queue = ctx.wgrad_queue
        time.sleep(ctx.backward_s / 2 if queue is not None else ctx.backward_s)
        if queue is not None:
            queue.append(lambda: time.sleep(ctx.backward_s / 2))
        return grad, None, None, None


class SleepStage(nn.Module):
    wgrad_queue = None  # set by the runner for schedules with W actions, as on the TP linear layers

    def __init__(self, pre_process: bool, post_process: bool, layer_numbers: list[int], num_chunks: int):
        super().__init__()
        self.pre_process, self.post_process = pre_process, post_process
        self.scale = nn.Parameter(torch.ones(HIDDEN))
        self.forward_s, self.backward_s = FORWARD_S / num_chunks, BACKWARD_S / num_chunks
        self.input_tensor = None

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        hidden = batch * self.scale if self.pre_process else self.input_tensor * self.scale
        hidden = _Sleep.apply(hidden, self.forward_s, self.backward_s, self.wgrad_queue)
        return hidden.sum(-1).transpose(0, 1) if self.post_process else hidden


def _forward_step(data_iterator, model):
    output = model(next(data_iterator))
    return output, lambda out: (out.mean(), {"lm loss": out.mean().detach()})


def _time_runner_parts(parts: dict) -> None:
    """Accumulate the wall seconds this process's pipeline runner spends starting ops ("post": Post and the
    start of a blocking Exchange), waiting for receives and for sends, and in the whole run, into `parts`."""
    from megatron_lite.pipeline import runner

    def timed(name_of, method):
        def wrapper(self, *args, **kwargs):
            key = name_of(*args)
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                parts[key] = parts.get(key, 0.0) + time.perf_counter() - start
        return wrapper

    def run_start(actions) -> str:
        parts["run_start"] = time.perf_counter()  # when the action loop starts
        return "run"

    run = runner._PipelineRun
    run.post = timed(lambda ops, background=False: "post", run.post)
    run.wait = timed(lambda ops: "wait_recv" if any(op.kind.startswith("recv") for op in ops) else "wait_send",
                     run.wait)
    run._run = timed(run_start, run._run)


def _measure(pp: int, vp: int | None, schedule: str, overlap: bool, counts: list[int], repeats: int,
             breakdown: bool = False, transport: str = "auto") -> list[dict]:
    """On every rank: the best of `repeats` steps per m: step time, idle fraction, mean compute per F/B/W
    (and with `breakdown`, that step's seconds per runner part, _time_runner_parts)."""
    torch.set_num_threads(1)
    parts: dict = {}
    if breakdown:
        _time_runner_parts(parts)
    ps.initialize_model_parallel(1, pp, vp)
    rows = []
    for m in counts:
        cfg = Config(world_size=pp)
        cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = pp * (vp or 1), HIDDEN, 2
        cfg.model.seq_length = SEQ
        cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size = pp, vp
        cfg.parallel.pipeline_schedule, cfg.parallel.overlap_p2p_comm = schedule, overlap
        cfg.parallel.pipeline_p2p_transport = transport
        cfg.training.global_batch_size = m
        cfg.validate()
        groups = ps.get_process_groups()
        chunks = build_model_chunks(cfg, lambda pre, post, layers: SleepStage(pre, post, layers, vp or 1), groups)
        forward_backward = get_forward_backward_func(cfg, groups)
        best = None
        for _ in range(repeats):
            data = [torch.randn(SEQ, 1, HIDDEN) for _ in range(m)]
            iterators = [iter(data) for _ in chunks] if len(chunks) > 1 else iter(data)
            collectives.barrier()
            stats: dict = {}
            parts.clear()
            start = time.perf_counter()
            forward_backward(forward_step_func=_forward_step, data_iterator=iterators, model=chunks, num_microbatches=m,
                             seq_length=SEQ, micro_batch_size=1, config=cfg, stats=stats)
            # the step ends when the slowest rank ends
            elapsed = collectives.all_reduce_scalar(time.perf_counter() - start, op="max")
            compute = stats["compute_s"]
            idle = 1.0 - sum(compute.values()) / elapsed
            if best is None or elapsed < best[0]:
                setup = parts.get("run_start", start) - start  # building the schedule and the runner
                best = (elapsed, idle, {kind: seconds / (m * len(chunks)) for kind, seconds in compute.items()},
                        {**parts, "compute": sum(compute.values()), "setup": setup}, stats["p2p_transport"])
        rows.append({"m": m, "step_s": best[0], "idle": best[1], "per_action_s": best[2], "schedule": forward_backward.schedule,
                     "parts": best[3], "transport": best[4]})
    return rows


def _round_trips(idles: tuple, count: int) -> dict:
    """On 2 ranks: median seconds of a send + receive round trip of one [SEQ, 1, HIDDEN] message, per
    --pipeline-p2p-transport and idle time before each trip (this VM is slower right after an idle moment)."""
    from megatron_lite.pipeline import p2p, shm_p2p
    torch.set_num_threads(1)
    ps.initialize_model_parallel(1, 2)
    groups = ps.get_process_groups()
    shape, peer, out = (SEQ, 1, HIDDEN), 1 - groups.pp.rank, {}
    for transport in ("shm", "process-group"):
        channel = shm_p2p.connect(groups, shape, torch.float32, torch.device("cpu"), transport)
        kw = dict(shape=shape, dtype=torch.float32, device=torch.device("cpu"), groups=groups, transport=channel)
        for idle in idles:
            times = []
            for _ in range(count + 5):  # the first 5 warm up
                time.sleep(idle)
                start = time.perf_counter()
                for kind in (("send", "recv") if groups.pp.rank == 0 else ("recv", "send")):
                    direction = "act" if (kind == "send") == (groups.pp.rank == 0) else "grad"
                    tensor = torch.ones(shape) if kind == "send" else None
                    p2p.post_ops([(kind, tensor, peer, direction)], **kw).wait(kind)
                times.append(time.perf_counter() - start)
            out[(transport, idle)] = sorted(times[5:])[count // 2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=3, help="steps per configuration in one round (the fastest counts)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="sweeps over every configuration; each row keeps its fastest step over all rounds, so a "
                             "burst of load from other jobs on a shared machine spoils one round, not the row")
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved", "zb-h1", "zbv"])
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 6, 8, 16])
    parser.add_argument("--overlap", choices=["both", "on", "off"], default="both",
                        help="rows with --overlap-p2p-comm on, off or both")
    parser.add_argument("--transport", choices=["auto", "process-group", "both"], default="auto",
                        help="--pipeline-p2p-transport of the rows: auto (shared memory, the ranks being on one "
                             "host), process-group (gloo p2p) or both")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print where each rank's idle time goes (ms per step: starting ops, waiting for "
                             "receives, waiting for sends, other runner work) beside the simulator's idle")
    parser.add_argument("--round-trip", action="store_true",
                        help="only measure a p2p round trip between 2 ranks per transport, after 0, 5 and 20 ms idle")
    args = parser.parse_args()
    if args.round_trip:
        trips = run_distributed(_round_trips, 2, idles=(0.0, 0.005, 0.02), count=55)[0]
        print("| p2p | idle before (ms) | round trip, median of 55 (ms) |\n|---|---|---|")
        for (transport, idle), seconds in trips.items():
            print(f"| {transport} | {1000 * idle:.0f} | {1000 * seconds:.3f} |")
        return
    counts = args.counts
    overlaps = {"both": (False, True), "on": (True,), "off": (False,)}[args.overlap]
    transports = ("auto", "process-group") if args.transport == "both" else (args.transport,)
    configs = [(pp, schedule, overlap, transport) for pp in args.pp for schedule in args.schedules
               for overlap in overlaps for transport in transports]
    best: dict[tuple, list] = {}  # (pp, schedule, overlap, transport, m) -> every rank's row of the fastest step
    for round_ in range(args.rounds):
        for pp, schedule, overlap, transport in configs:
            vp = 2 if schedule in ("interleaved", "zbv") else None
            per_rank = run_distributed(_measure, pp, timeout=600.0, pp=pp, vp=vp, schedule=schedule, overlap=overlap,
                                       counts=counts, repeats=args.repeats, breakdown=args.breakdown, transport=transport)
            for index, m in enumerate(counts):
                rows = [ranks[index] for ranks in per_rank]
                key = (pp, schedule, overlap, transport, m)
                if key not in best or rows[0]["step_s"] < best[key][0]["step_s"]:
                    best[key] = rows
            print(f"round {round_ + 1}/{args.rounds}: PP {pp} {schedule} overlap {overlap} {transport} done", flush=True)
    lines = ["| PP | VP | schedule | overlap | p2p | m | step (s) | measured idle (mean / max over stages) | simulator | "
             f"simulator at measured F/B/W | measured - simulator (points) | simulator, {P2P_S * 1000:.0f} ms per p2p op | "
             "theory of step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pp, schedule, overlap, transport in configs:
        vp = 2 if schedule in ("interleaved", "zbv") else 1
        lines += [_row(pp, vp, schedule, overlap, m, best[(pp, schedule, overlap, transport, m)]) for m in counts]
    table = "\n".join(lines)
    cpu = platform.processor() or platform.machine()
    header = (f"\n## Pipeline bubble (benchmarks/bench_pipeline_bubble.py), {datetime.date.today().isoformat()}\n\n"
              f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, gloo process groups; the pipeline's p2p as "
              "the p2p column says (shm: --pipeline-p2p-transport auto, the ranks sharing a host; process-group: gloo "
              "p2p). Stage compute is a sleep "
              f"(forward {FORWARD_S * 1000:.0f} ms, backward {BACKWARD_S * 1000:.0f} ms per stage, split over virtual "
              "stages) so that PP ranks on 2 shared cores do not contend; measured idle includes the real p2p and "
              "runtime overhead. Idle fraction = 1 - compute time / step time, per stage (compute: wall time inside "
              f"the model's forward, B and W). Fastest of {args.repeats} steps x {args.rounds} rounds per row.\n\n")
    if args.breakdown:
        table += "\n\n" + _breakdown_table(configs, counts, best)
    print(header + table)
    if args.append:
        append_results(header + table + "\n")


def _row(pp: int, v: int, schedule: str, overlap: bool, m: int, ranks: list[dict]) -> str:
    idle = [rank["idle"] for rank in ranks]
    schedules = all_rank_schedules(schedule, pp, v, m, overlap=overlap)
    simulated = simulate(schedules, FORWARD_S / v, BACKWARD_S / v, weight_time=BACKWARD_S / v / 2)
    with_p2p = simulate(schedules, FORWARD_S / v, BACKWARD_S / v, p2p_time=P2P_S, weight_time=BACKWARD_S / v / 2)
    mean_idle, sim_idle = sum(idle) / pp, _idle_at_measured(schedules, ranks)
    theory = _theory(schedule, pp, v, m)
    return (f"| {pp} | {v} | {schedule} | {'on' if overlap else 'off'} | {ranks[0]['transport']} | {m} | {ranks[0]['step_s']:.3f} | "
            f"{mean_idle:.3f} / {max(idle):.3f} | {sum(simulated) / pp:.3f} | {sim_idle:.3f} | "
            f"{100 * (mean_idle - sim_idle):+.1f} | {sum(with_p2p) / pp:.3f} | "
            f"{'-' if theory is None else f'{theory:.3f}'} |")


def _idle_at_measured(schedules: list, ranks: list[dict]) -> float:
    """The simulator's idle fraction, mean over ranks, at the compute times the ranks measured (mean F, B, W)."""
    measured = {kind: sum(r["per_action_s"][kind] for r in ranks) / len(ranks) for kind in ("F", "B", "W")}
    idle = simulate(schedules, measured["F"], measured["B"] + measured["W"], weight_time=measured["W"])
    return sum(idle) / len(idle)


def _breakdown_table(configs: list, counts: list[int], best: dict) -> str:
    """Per row, mean over ranks in ms per step of the fastest step: idle as measured and as the simulator
    (at the measured compute) has it, and the measured idle split into starting ops, waiting for receives,
    waiting for sends and the rest of the runner's work outside compute; before the first action: building
    the schedule and the runner; after the last action: until the slowest rank ends (a rank that ends
    early idles there, in the simulator too)."""
    lines = ["| PP | schedule | overlap | p2p | m | idle measured (ms) | idle simulated (ms) | post (ms) | wait for receives (ms) | "
             "wait for sends (ms) | other runner work (ms) | before the first action (ms) | after the last action (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pp, schedule, overlap, transport in configs:
        v = 2 if schedule in ("interleaved", "zbv") else 1
        for m in counts:
            ranks = best[(pp, schedule, overlap, transport, m)]
            step = ranks[0]["step_s"]
            simulated = _idle_at_measured(all_rank_schedules(schedule, pp, v, m, overlap=overlap), ranks)
            mean = {key: 1000 * sum(r["parts"].get(key, 0.0) for r in ranks) / pp
                    for key in ("run", "compute", "post", "wait_recv", "wait_send", "setup")}
            other = mean["run"] - mean["compute"] - mean["post"] - mean["wait_recv"] - mean["wait_send"]
            idle = 1000 * sum(r["idle"] for r in ranks) / pp * step
            lines.append(f"| {pp} | {schedule} | {'on' if overlap else 'off'} | {ranks[0]['transport']} | {m} | {idle:.1f} | {1000 * simulated * step:.1f} | "
                         f"{mean['post']:.1f} | {mean['wait_recv']:.1f} | {mean['wait_send']:.1f} | {other:.1f} | "
                         f"{mean['setup']:.1f} | {1000 * step - mean['run'] - mean['setup']:.1f} |")
    return "\n".join(lines)


def _theory(schedule: str, pp: int, v: int, m: int):
    """Idle fraction of the step by the papers' formulas: (p - 1)(F + B) over m v chunk-steps for GPipe,
    1F1B and interleaved (Narayanan et al. 2021); (p - 1)(F + B - W) for ZB-H1 and, for ZB-V, zero beyond
    the fill (p - 1) F / 2 at F = B = W once m >= 2p - 1 (Qi et al. 2024; schedules.zbv_schedule). None
    where no formula applies (ZB-V below 2p - 1 micro-batches, or F, B, W unequal)."""
    f, b, w = FORWARD_S, BACKWARD_S / 2, BACKWARD_S / 2
    if schedule == "zb-h1":
        bubble = (pp - 1) * (f + b - w)
        return bubble / (m * (f + b + w) + bubble)
    if schedule == "zbv":
        if m < 2 * pp - 1 or not f == b == w:
            return None
        bubble = (pp - 1) * f / 2
        return bubble / (m * (f + b + w) + bubble)
    return (pp - 1) / (v * m + pp - 1)


if __name__ == "__main__":
    main()
