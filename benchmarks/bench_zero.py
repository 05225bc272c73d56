"""Per-rank memory and throughput of each data-parallel sharding strategy and optimizer offload.

    python benchmarks/bench_zero.py [--world 8] [--layers 4] [--hidden 512] [--vocab 8192] [--steps 3] [--append]
    python benchmarks/bench_zero.py --layers 24 --hidden 1024 --vocab 50257 --steps 1 --append   # GPT-2 medium, 354M

Each configuration runs in its own set of `--world` gloo processes (DP = world, one thread each), so each
process's peak resident set belongs to that configuration alone. Per rank it reports: the peak RSS growth
from just before the model is built to after the last step (measured), the optimizer/memory.py report
(device bytes, host/disk bytes for offloaded state) and the bytes/param formula of optimizer/memory.py's
table, tokens/s relative to ZeRO-1 (fastest step after one warm-up), and the headline: the largest model
whose parameter+gradient+optimizer bytes fit the machine's memory with `--world` ranks under each strategy
(formula x measured bytes/param, less the measured per-rank runtime baseline; activations excluded).
ZeRO-3's bytes/param are those at rest; during a step each rank also holds up to two gathered units
(distributed/zero3.py), reported next to the headline.

Before launching a configuration it predicts the machine-wide peak (per rank: runtime baseline + the
strategy's bytes/param, or the build's if larger); one that would not fit
`--memory-gib` is reported as "does not fit" with the figure instead of being run into the OOM killer.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time

import torch

from megatron_lite import parallel_state as ps
from megatron_lite.config import Config
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
from megatron_lite.optimizer import get_megatron_optimizer, memory_report

SEQ, MICRO_BATCH = 128, 1
BASELINE_MIB = 450  # a gloo rank with torch imported, measured by this script at 16.9M params (RESULTS.md)
VARIANTS = {  # name -> (strategy, offload)
    "no_shard": ("no_shard", None), "ZeRO-1 (optim)": ("optim", None), "ZeRO-2 (optim_grads)": ("optim_grads", None),
    "ZeRO-2 + CPU offload 1.0": ("optim_grads", "cpu"), "ZeRO-2 + NVMe offload 1.0": ("optim_grads", "nvme"),
    "ZeRO-3 (optim_grads_params)": ("optim_grads_params", None),
    "ZeRO-3 + CPU offload 1.0": ("optim_grads_params", "cpu"),
}


def formula_bytes_per_param(strategy: str, d: int, bf16: bool) -> float:
    """optimizer/memory.py's table (Adam, fp32 grad buffer): all bytes, wherever they live."""
    if bf16:
        return {"no_shard": 18, "optim": 6 + 12 / d, "optim_grads": 2 + 16 / d, "optim_grads_params": 18 / d}[strategy]
    return {"no_shard": 16, "optim": 8 + 8 / d, "optim_grads": 4 + 12 / d, "optim_grads_params": 16 / d}[strategy]


def make_config(world: int, layers: int, hidden: int, vocab: int, strategy: str, offload, bf16: bool, nvme_dir: str) -> Config:
    cfg = Config(world_size=world)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = layers, hidden, max(1, hidden // 64), SEQ
    m.vocab_size, m.hidden_dropout, m.attention_dropout = vocab, 0.0, 0.0
    cfg.parallel.data_parallel_sharding_strategy = strategy
    cfg.parallel.ddp_bucket_size = 4_000_000
    cfg.training.micro_batch_size, cfg.training.global_batch_size = MICRO_BATCH, MICRO_BATCH * world
    cfg.optimizer.bf16 = bf16
    cfg.optimizer.optimizer_cpu_offload = offload == "cpu"
    cfg.optimizer.optimizer_nvme_offload_dir = nvme_dir if offload == "nvme" else None
    return cfg.validate()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def forward_step(data_iterator, model):
    sample = next(data_iterator)
    output = model(sample["tokens"], None, None, sample["labels"])
    return output, lambda loss: (loss.mean(), {"lm loss": loss.mean().detach()})


def bench(world: int, layers: int, hidden: int, vocab: int, strategy: str, offload, bf16: bool, steps: int,
          nvme_dir: str) -> dict:
    from megatron_lite.models.gpt.model import GPTModel
    from megatron_lite.pipeline import get_forward_backward_func

    torch.set_num_threads(1)
    ps.initialize_model_parallel()
    groups = ps.get_process_groups()
    cfg = make_config(world, layers, hidden, vocab, strategy, offload, bf16, nvme_dir)
    baseline = _rss_mib()
    with torch.device("meta"):  # as training.build_model: parameters are drawn into DDP's storage
        module = GPTModel(cfg, groups=groups)
    model = [DistributedDataParallel(cfg, module, groups=groups, init_device=torch.device("cpu"))]
    opt = get_megatron_optimizer(cfg, model, groups)
    report = memory_report(model, opt)  # at start-up, as training logs it
    forward_backward = get_forward_backward_func(cfg, groups)
    gen = torch.Generator().manual_seed(groups.dp.rank)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        tokens = torch.randint(0, vocab, (MICRO_BATCH, SEQ + 1), generator=gen)
        start = time.perf_counter()
        opt.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter([{"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}]),
                         model=model, num_microbatches=1, seq_length=SEQ, micro_batch_size=MICRO_BATCH, config=cfg,
                         no_sync_func=model[0].no_sync, finalize_model_grads_func=finalize_model_grads)
        opt.step()
        model[0].finish_param_sync()
        times.append(time.perf_counter() - start)
    opt.close()
    zero3 = model[0].zero3
    return {"report": report, "baseline_mib": baseline, "peak_growth_mib": _rss_mib() - baseline,
            "step_time": min(times[1:]), "tokens_per_s": MICRO_BATCH * world * SEQ / min(times[1:]),
            "peak_units": zero3.peak_gathered if zero3 is not None else None,
            "largest_unit_mib": max((sum(b.numel for _, b in u.buckets) * _element_size(u) for u in zero3.units), default=0) / 2**20
            if zero3 is not None else 0.0}


def _element_size(unit) -> int:
    """Bytes per element of a ZeRO-3 unit's parameters."""
    buffer = unit.buckets[0][0]
    return torch.empty((), dtype=buffer.param_dtype).element_size()


def approx_params(layers: int, hidden: int, vocab: int) -> int:
    """GPT parameters with a 4h MLP, biases, learned positions and tied embeddings (the model make_config builds)."""
    return layers * (12 * hidden * hidden + 13 * hidden) + (vocab + SEQ) * hidden + 2 * hidden


def predicted_peak_gib(strategy: str, offload, world: int, bf16: bool, num_params: int) -> float:
    """Machine-wide peak: per rank the runtime baseline and the larger of the strategy's bytes/param
    (offloaded state counts too: host memory is this machine's memory) plus its transient gradients (ZeRO-2:
    the full gradient until the reduce-scatter; ZeRO-3 without --overlap-grad-reduce: one unit), and the
    build: the model is built on the meta device and drawn straight into DDP's storage (training.build_model),
    4 bytes/param (ZeRO-3: its shard) plus one unit."""
    steady = formula_bytes_per_param(strategy, world, bf16) + 0.5
    if strategy == "optim_grads":  # the full fp32 gradient lives until the last micro-batch's reduce-scatter
        steady += 4                # (param_and_grad_buffer.py's accumulation rule; memory_report's grads_peak)
    build = 4 / world if strategy == "optim_grads_params" else 4
    per_param = world * max(build, steady)
    return (world * BASELINE_MIB * 2**20 + per_param * num_params) / 2**30


def _row(name: str, strategy: str, offload, result: dict, world: int, bf16: bool, base_tps: float) -> str:
    r = result["report"]
    # Offloading fp32 training adds a host/disk fp32 main copy (4/d) that aliased the model param on the device.
    formula = formula_bytes_per_param(strategy, world, bf16) + (4 / world if offload and not bf16 else 0)
    return (f"| {name} | {r['num_params'] / 1e6:.1f} | {r['device_total'] / 2**20:.1f} | {(r['host'] + r['disk']) / 2**20:.1f} "
            f"| {r['bytes_per_param']:.2f} | {formula:.2f} | {r['device_bytes_per_param']:.2f} "
            f"| {result['peak_growth_mib']:.0f} | {result['tokens_per_s']:.0f} | {result['tokens_per_s'] / base_tps:.2f}x |")


def main() -> None:
    from megatron_lite.testing import run_distributed
    from results import report

    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default="", help="comma-separated subset of the configurations (default all): "
                        + ", ".join(VARIANTS))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--memory-gib", type=float, default=24.0, help="the machine's memory, for the headline")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    nvme_dir = tempfile.mkdtemp(prefix="bench_zero_nvme_")
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    num_params = approx_params(args.layers, args.hidden, args.vocab)
    results, skipped = {}, {}
    try:
        for name in chosen:
            strategy, offload = VARIANTS[name]
            need = predicted_peak_gib(strategy, offload, args.world, args.bf16, num_params)
            if need > 0.9 * args.memory_gib:
                skipped[name] = need
                print(f"{name}: does not fit: about {need:.1f} GiB predicted for {args.world} ranks > 90% of "
                      f"{args.memory_gib:.0f} GiB; skipped", flush=True)
                continue
            start = time.perf_counter()
            results[name] = run_distributed(bench, args.world, timeout=3600, world=args.world, layers=args.layers,
                                             hidden=args.hidden, vocab=args.vocab, strategy=strategy, offload=offload,
                                             bf16=args.bf16, steps=args.steps, nvme_dir=nvme_dir)[0]  # rank 0 (ranks are alike)
            print(f"{name}: {results[name]['step_time']:.1f} s/step, ran {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        shutil.rmtree(nvme_dir, ignore_errors=True)
    base_name = "ZeRO-1 (optim)" if "ZeRO-1 (optim)" in results else next(iter(results))
    base_tps = results[base_name]["tokens_per_s"]
    lines = ["| config | params (M) | device MiB/rank | host+disk MiB/rank | bytes/param | formula | device bytes/param "
             f"| peak RSS growth MiB/rank (measured) | tokens/s | vs {base_name.split(' ')[0]} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in chosen:
        if name in results:
            lines.append(_row(name, *VARIANTS[name], results[name], args.world, args.bf16, base_tps))
        else:
            lines.append(f"| {name} | {num_params / 1e6:.1f} | does not fit: about {skipped[name]:.1f} GiB predicted for "
                         f"{args.world} ranks (formula {formula_bytes_per_param(VARIANTS[name][0], args.world, args.bf16):.2f}"
                         " bytes/param + baseline) | | | | | | | |")
    baseline = max(r["baseline_mib"] for r in results.values())
    budget = args.memory_gib * 2**30 - args.world * baseline * 2**20
    lines += ["", f"Largest model whose params + grads + optimizer states fit {args.memory_gib:.0f} GiB with {args.world} "
              f"ranks (each rank's runtime baseline {baseline:.0f} MiB measured; activations excluded), at rest and, "
              "for ZeRO-2, at its peak (the full fp32 gradient lives until the last micro-batch's reduce-scatter):", ""]
    for name, (strategy, offload) in VARIANTS.items():
        if offload is None and name in chosen:
            bpp = formula_bytes_per_param(strategy, args.world, args.bf16)
            text = f"- {name}: {budget / (args.world * bpp) / 1e9:.2f} B parameters ({bpp:.2f} bytes/param/rank)"
            if strategy == "optim_grads":
                text += f"; at its peak {budget / (args.world * (bpp + 4)) / 1e9:.2f} B ({bpp + 4:.2f} bytes/param/rank)"
            if name in results:  # what this run needed per parameter, everything included
                measured = results[name]["peak_growth_mib"] * 2**20 / results[name]["report"]["num_params"]
                text += (f"; by this run's measured peak RSS growth ({measured:.2f} bytes/param/rank: states, gathered "
                         f"units, activations, allocator) {budget / (args.world * measured) / 1e9:.2f} B")
            lines.append(text)
    zero3 = results.get("ZeRO-3 (optim_grads_params)")
    if zero3 is not None:
        lines.append(f"- ZeRO-3 also holds up to {zero3['peak_units']} gathered units per rank during a step (here the largest "
                     f"unit is {zero3['largest_unit_mib']:.1f} MiB), on top of its bytes/param at rest")
    lines.append(f"- NVMe offload 1.0 keeps 12/d bytes/param on disk: with ZeRO-2 "
                 f"{budget / (args.world * (formula_bytes_per_param('optim_grads', args.world, args.bf16) - 12 / args.world)) / 1e9:.2f} B "
                 "parameters by memory (disk space and bandwidth permitting)")
    header = (f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.world} gloo ranks (DP), "
              f"1 thread each; GPT {args.layers} layers x {args.hidden} hidden, vocab {args.vocab}, seq {SEQ}, micro batch "
              f"{MICRO_BATCH}, {'bf16' if args.bf16 else 'fp32'}, Adam; fastest of {args.steps} steps after a warm-up")
    report("ZeRO sharding and optimizer offload (bench_zero.py)", header, lines, args.append)


if __name__ == "__main__":
    main()
