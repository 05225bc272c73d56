"""Initialisation at scale: time and peak memory per rank to build a GPT-1.3B-shaped model and to finish
its first step, today's code against the code before deferred, tiled initialisation.

    python benchmarks/bench_init.py [--world 8] [--layers 24] [--small-layers 2] [--before-rev REV] [--full-step] [--append]

GPT-1.3B's shape (hidden 2048, 16 heads, FFN 8192, vocab 50257, seq 128, fp32) on `--world` gloo processes
(one thread each), in two layouts: TP = world, and ZeRO-3 (--data-parallel-sharding-strategy
optim_grads_params) at DP = world. "before" runs the same measurement against `megatron_lite` exported
from `--before-rev` (default: main just before this change: one sequential generator stream per
parameter; under ZeRO-3 every rank builds its whole model, then DDP keeps 1/DP of it); "after" is this
tree (tiles drawn from their own streams, only those a rank's shard needs; ZeRO-3 builds on the meta
device and draws each rank's shard straight into it, training.build_model).

Per rank: the peak RSS growth while the model is built (model and, for ZeRO-3, DDP; sampled every 2 ms)
and the build time; with a first step (DDP, Adam, one micro-batch of 128 tokens per rank), the time from
the start of the build to the end of the first optimizer step and the process's peak RSS. `--layers`
rows build only; `--small-layers` rows (the 1.3B shape with fewer layers) also take the first step: the
before-ZeRO-3 path needs the whole model on each of the 8 ranks (5.3 GB each at 24 layers), and a step
needs 16 bytes/param, neither of which fits this shared machine at 24 layers. `--full-step` adds the whole
model's first step on `--world` ranks with today's code in the layout that fits: ZeRO-3 with bf16
parameters and the optimizer's fp32 main parameters and moments in per-rank files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

_CODE = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv else None
sys.path.insert(0, _CODE or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _CODE:  # a rank's forkserver preloaded this tree's megatron_lite (the editable install): use _CODE's
    for _name in [n for n in sys.modules if n == "megatron_lite" or n.startswith("megatron_lite.")]:
        del sys.modules[_name]
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron_lite import parallel_state as ps  # noqa: E402
from megatron_lite.config import Config  # noqa: E402
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads  # noqa: E402
from megatron_lite.models.gpt import GPTModel  # noqa: E402
from megatron_lite.optimizer import get_megatron_optimizer  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402

from bench_checkpoint import PeakRSS  # noqa: E402

SEQ, VOCAB = 128, 50257
BEFORE_REV = "2440dce"  # main before tiled, deferred initialisation


def _config(world: int, layers: int, shape: tuple[int, int, int], layout: str) -> Config:
    hidden, ffn, vocab = shape
    cfg = Config(world_size=world)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size = layers, hidden, max(1, hidden // 128), ffn
    m.seq_length, m.max_position_embeddings, m.vocab_size = SEQ, SEQ, vocab
    m.hidden_dropout = m.attention_dropout = 0.0
    p = cfg.parallel
    if layout == "tp":
        p.tensor_model_parallel_size = world
    else:
        p.data_parallel_sharding_strategy, p.use_distributed_optimizer = "optim_grads_params", True
    if layout == "zero3-bf16-nvme":
        # the whole 1.3B first step on 8 ranks of a 24 GiB machine: bf16 parameters (fp32 gradients and main
        # parameters) and the fp32 main parameters and Adam moments in per-rank files (optimizer/offload.py)
        cfg.optimizer.bf16 = True
        cfg.optimizer.optimizer_nvme_offload_dir = os.path.join(tempfile.gettempdir(), f"bench_init_nvme_{os.getpid()}")
    cfg.training.micro_batch_size = 1
    cfg.training.global_batch_size = 1 if layout == "tp" else world
    return cfg.validate()


def _build(cfg: Config, layout: str, groups) -> list:
    """The model chunk, DDP-wrapped for ZeRO-3: through training.build_model where it exists (after), else
    built whole and handed to DDP (before)."""
    if layout == "tp":
        return [GPTModel(cfg, groups=groups)]
    try:
        from megatron_lite.training import build_model
    except ImportError:
        return [DistributedDataParallel(cfg, GPTModel(cfg, groups=groups), groups=groups)]
    return build_model(cfg, lambda pre, post, layers: GPTModel(cfg, pre, post, layers, groups=groups), groups)


def _rank(world: int, layers: int, shape: tuple, layout: str, step: bool) -> dict:
    torch.set_num_threads(1)
    cfg = _config(world, layers, shape, layout)
    ps.initialize_model_parallel(world if layout == "tp" else 1, 1)
    zero3 = layout.startswith("zero3")
    groups = ps.get_process_groups()
    torch.distributed.barrier()
    start = time.perf_counter()
    with PeakRSS() as build:
        model = _build(cfg, layout, groups)
    if layout == "tp":
        held = sum(p.numel() * p.element_size() for p in model[0].parameters())
    else:
        held = sum(b.param_shard.numel() * b.param_shard.element_size()
                   for buffer in model[0].param_and_grad_buffers for b in buffer.buckets)
    out = {"build_s": build.seconds, "build_extra_mib": build.extra_mib, "held_mib": held / 2**20,
           "code": os.path.dirname(os.path.dirname(sys.modules[DistributedDataParallel.__module__].__file__))}
    if step:
        ddp = model[0] if zero3 else DistributedDataParallel(cfg, model[0], groups=groups)
        optimizer = get_megatron_optimizer(cfg, [ddp], groups)
        tokens = torch.randint(0, cfg.model.vocab_size, (world, SEQ + 1), generator=torch.Generator().manual_seed(0))
        local = tokens[groups.dp.rank:groups.dp.rank + 1]
        optimizer.zero_grad()
        ddp(local[:, :-1], torch.arange(SEQ).expand(1, SEQ), None, local[:, 1:]).float().mean().backward()
        finalize_model_grads([ddp], groups)
        optimizer.step()
        out["first_step_s"] = time.perf_counter() - start
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if cfg.optimizer.optimizer_nvme_offload_dir:
            shutil.rmtree(cfg.optimizer.optimizer_nvme_offload_dir, ignore_errors=True)
    ps.destroy_model_parallel()
    return out


def _measure(cases: list[tuple], args, shape) -> list[dict]:
    rows = []
    for layout, layers, step, world in cases:
        outs = run_distributed(_rank, world, timeout=3600, world=world, layers=layers, shape=shape, layout=layout,
                               step=step)
        rows.append({"layout": layout, "layers": layers, "step": step, "world": world, "held_mib": outs[0]["held_mib"],
                     "build_s": max(o["build_s"] for o in outs), "build_extra_mib": max(o["build_extra_mib"] for o in outs),
                     "first_step_s": max(o["first_step_s"] for o in outs) if step else None,
                     "peak_rss_mib": max(o["peak_rss_mib"] for o in outs) if step else None,
                     "load": os.getloadavg()[0], "code": outs[0]["code"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _before(args, cases) -> list[dict]:
    """The same cases against megatron_lite exported from args.before_rev, in a process of its own."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="bench_init_before_") as code:
        archive = subprocess.run(["git", "-C", repo, "archive", args.before_rev, "megatron_lite"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", code], input=archive, check=True)
        out = os.path.join(code, "rows.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--code", code, "--rows-json", out,
                        "--cases", json.dumps(cases), "--hidden", str(args.hidden),
                        "--ffn", str(args.ffn), "--vocab", str(args.vocab)], check=True)
        with open(out) as f:
            rows = json.load(f)
        if any(not r["code"].startswith(code) for r in rows):
            raise RuntimeError(f"bench_init: the 'before' rows ran this tree's megatron_lite, not {code}'s")
        return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layers", type=int, default=24, help="layers of the build-only rows")
    parser.add_argument("--small-layers", type=int, default=1, help="layers of the ZeRO-3 rows that fit before's path")
    parser.add_argument("--step-world", type=int, default=4, help="processes of the rows that also take a first step")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--before-rev", default=BEFORE_REV, help="the commit whose megatron_lite gives the 'before' rows")
    parser.add_argument("--full-step", action="store_true",
                        help="Also the whole model's first step on --world ranks (ZeRO-3, bf16 parameters, optimizer "
                             "states in per-rank files under the temp directory): today's code only, since before's "
                             "path cannot build it on one machine")
    parser.add_argument("--only-full-step", action="store_true", help="Run only the --full-step row")
    parser.add_argument("--append", action="store_true", help="Append the table to benchmarks/RESULTS.md.")
    parser.add_argument("--code", help=argparse.SUPPRESS)  # (read before the imports) run against this megatron_lite
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.hidden, args.ffn, args.vocab)
    if args.rows_json:  # the 'before' child
        rows = _measure([tuple(c) for c in json.loads(args.cases)], args, shape)
        with open(args.rows_json, "w") as f:
            json.dump(rows, f)
        return
    load_start = os.getloadavg()
    before_cases = [("tp", args.layers, False, args.world), ("zero3", args.small_layers, False, args.world),
                    ("zero3", args.small_layers, True, args.step_world)]
    after_cases = before_cases + [("zero3", args.layers, False, args.world)]
    full = [("zero3-bf16-nvme", args.layers, True, args.world)] if args.full_step or args.only_full_step else []
    if args.only_full_step:
        before_cases, after_cases = [], []
    results = [("before", r) for r in (_before(args, before_cases) if before_cases else [])] + \
        [("after", r) for r in _measure(after_cases + full, args, shape)]
    lines = ["| code | layout | layers | params held MiB/rank | build s (slowest rank) | peak extra MiB/rank during build"
             " (max) | first step s (slowest rank) | peak RSS MiB/rank (max) | load (1 min) |", "|" + "---|" * 9]
    for label, r in sorted(results, key=lambda lr: (lr[1]["layout"], lr[1]["step"], lr[1]["layers"], lr[0] == "after")):
        layout = {"tp": f"TP {r['world']}", "zero3": f"ZeRO-3 DP {r['world']}",
                  "zero3-bf16-nvme": f"ZeRO-3 DP {r['world']}, bf16, optimizer states on disk"}[r["layout"]]
        first = "-" if r["first_step_s"] is None else f"{r['first_step_s']:.1f}"
        peak = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {label} | {layout} | {r['layers']} | {r['held_mib']:.0f} | {r['build_s']:.1f} | "
                     f"{r['build_extra_mib']:.0f} | {first} | {peak} | {r['load']:.1f} |")
    header = (f"GPT shape hidden {args.hidden}, FFN {args.ffn}, {max(1, args.hidden // 128)} heads, vocab {args.vocab} "
              f"(GPT-1.3B: 2048, 8192, 16, 50257), seq {SEQ}, fp32, gloo processes with one thread each; "
              f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average "
              f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; the last column: after each "
              f"row), torch {torch.__version__}. 'before': megatron_lite at {args.before_rev}; 'after': this tree. "
              "Peak extra MiB includes, for ZeRO-3, DDP's gradient shards (as large as the parameter shards in "
              f"fp32). The ZeRO-3 'before' rows use {args.small_layers} layer(s): that path holds each rank's "
              "whole model at build time (5.3 GB per rank at 24 layers, 42 GB on 8 ranks); the first-step rows "
              f"use {args.step_world} processes, since a ZeRO-3 step with this vocabulary needs about 2 GB per rank "
              "(the gathered embedding unit, its gradient and the output layer's fp32 weight gradient) and 8 such "
              "processes do not fit next to the other jobs.")
    from results import report
    report("Initialisation at scale: deferred, tiled initialisation vs before (ZeRO-3 and TP)", header, lines, args.append)


if __name__ == "__main__":
    main()
