"""Pipeline bubble: measured idle fraction of 1F1B and interleaved 1F1B beside the simulator and theory.

Run by hand (not a test):  python benchmarks/bench_pipeline_bubble.py [--append]

Each stage's compute is a fixed sleep (forward f, backward b = 2f per stage, split evenly over its virtual
stages), so the measurement isolates the schedule and the real gloo p2p/runtime overhead from CPU
contention: the CI machine has 2 cores and PP = 4 runs 4 ranks. Per rank, busy = time inside forward and
backward compute; idle fraction = 1 - busy / step time (step time = slowest rank's wall time of
forward_backward_func). Theory: the bubble is (p - 1) / (v m) of the ideal time, i.e.
(p - 1) / (v m + p - 1) of the step time, which is what the simulator (simulator.py) reproduces exactly.
--append adds the table to benchmarks/RESULTS.md.
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
SEQ, HIDDEN = 4, 8
_BUSY = [0.0]  # per process: seconds spent in compute during the measured step


class _Sleep(torch.autograd.Function):
    """Stands for a chunk's layers: sleeps as long as their forward/backward would take."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        out = x * 1.0
        _BUSY[0] += time.perf_counter() - start
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = time.perf_counter()
        time.sleep(ctx.backward_s)
        _BUSY[0] += time.perf_counter() - start
        return grad, None, None


class SleepStage(nn.Module):
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
        hidden = _Sleep.apply(hidden, self.forward_s, self.backward_s)
        return hidden.sum(-1).transpose(0, 1) if self.post_process else hidden


def _forward_step(data_iterator, model):
    output = model(next(data_iterator))
    return output, lambda out: (out.mean(), {"lm loss": out.mean().detach()})


def _measure(pp: int, vp: int | None, counts: list[int], repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    ps.initialize_model_parallel(1, pp, vp)
    rows = []
    for m in counts:
        cfg = Config(world_size=pp)
        cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = pp * (vp or 1), HIDDEN, 2
        cfg.model.seq_length = SEQ
        cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size = pp, vp
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
            _BUSY[0] = 0.0
            start = time.perf_counter()
            forward_backward(forward_step_func=_forward_step, data_iterator=iterators, model=chunks, num_microbatches=m,
                             seq_length=SEQ, micro_batch_size=1, config=cfg)
            # the step ends when the slowest rank ends
            elapsed = collectives.all_reduce_scalar(time.perf_counter() - start, op="max")
            idle = 1.0 - _BUSY[0] / elapsed
            if best is None or elapsed < best[0]:
                best = (elapsed, idle)
        rows.append({"m": m, "step_s": best[0], "idle": best[1], "schedule": forward_backward.schedule})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    counts = [4, 8, 12, 16]
    lines = ["| PP | VP | schedule | m | step (s) | measured idle (mean / max over stages) | simulator | "
             "theory (p-1)/(vm+p-1) of step | theory (p-1)/(vm) of ideal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pp in (2, 4):
        for vp in (None, 2):
            per_rank = run_distributed(_measure, pp, timeout=600.0, pp=pp, vp=vp, counts=counts, repeats=args.repeats)
            v = vp or 1
            for index, m in enumerate(counts):
                idle = [rows[index]["idle"] for rows in per_rank]
                schedule = per_rank[0][index]["schedule"]
                simulated = simulate(all_rank_schedules(schedule, pp, v, m), FORWARD_S / v, BACKWARD_S / v)
                lines.append(f"| {pp} | {v} | {schedule} | {m} | {per_rank[0][index]['step_s']:.3f} | "
                             f"{sum(idle) / pp:.3f} / {max(idle):.3f} | {sum(simulated) / pp:.3f} | "
                             f"{(pp - 1) / (v * m + pp - 1):.3f} | {(pp - 1) / (v * m):.3f} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    cpu = platform.processor() or platform.machine()
    header = (f"\n## Pipeline bubble (benchmarks/bench_pipeline_bubble.py), {datetime.date.today().isoformat()}\n\n"
              f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, gloo. Stage compute is a sleep "
              f"(forward {FORWARD_S * 1000:.0f} ms, backward {BACKWARD_S * 1000:.0f} ms per stage, split over virtual "
              "stages) so that PP ranks on 2 shared cores do not contend; measured idle includes the real p2p and "
              "runtime overhead. Idle fraction = 1 - compute time / step time, per stage.\n\n")
    print(header + table)
    if args.append:
        append_results(header + table + "\n")


if __name__ == "__main__":
    main()
