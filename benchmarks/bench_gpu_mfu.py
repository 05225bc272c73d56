"""One-GPU throughput of megatron_lite's real training step: GPT ~1.3B (24 layers, hidden 2048, 16 heads),
seq 2048, bf16, TP = PP = DP = 1; tokens/s, TFLOP/s (Megatron's model-FLOPs formula, logging.py) and MFU,
for the local kernels and for --transformer-impl transformer_engine, then a profile of where the step's
GPU time goes (matmuls, attention, elementwise/norms, optimizer, copies, communication, other).

Written for an H100/H200 node (CUDA required; TE optional: its row is skipped with the reason):

    python benchmarks/bench_gpu_mfu.py --impl local transformer_engine --append-results
    python benchmarks/bench_gpu_mfu.py --impl transformer_engine --fp8-format hybrid

Target: MFU >= 50% against the dense bf16 peak (989 TFLOP/s on H100/H200 SXM, logging._PEAK_TFLOPS).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections import defaultdict
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results import append_results  # noqa: E402  (benchmarks/ is the script's own folder)

from megatron_lite.config import Config, ConfigError  # noqa: E402
from megatron_lite.logging import detect_peak_tflops, num_floating_point_operations  # noqa: E402

# Kernel-name fragments -> category, for the profile. First match wins.
CATEGORIES = [("communication", ("nccl", "allreduce", "all_gather", "reduce_scatter")),
              ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
              ("matmul", ("gemm", "cutlass", "sm90_xmma", "sm80_xmma", "cublas", "nvjet", "matmul")),
              ("optimizer", ("adam", "multi_tensor", "foreach")),
              ("norm", ("layer_norm", "layernorm", "rms")),
              ("copy/cast", ("copy", "cast", "convert", "to_copy")),
              ("elementwise", ("elementwise", "vectorized", "gelu", "silu", "triton", "softmax", "reduce", "fill"))]


def make_config(args: argparse.Namespace, impl: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = args.layers, args.hidden, args.heads
    m.seq_length, m.vocab_size = args.seq, 50257
    m.hidden_dropout = m.attention_dropout = 0.0
    m.transformer_impl, m.torch_compile = impl, args.torch_compile
    m.fp8_format = args.fp8_format if impl == "transformer_engine" else None
    if args.recompute:
        m.recompute_granularity = args.recompute
        m.recompute_method = "uniform" if args.recompute == "full" else None
    cfg.training.micro_batch_size, cfg.training.global_batch_size = args.micro_batch, args.global_batch
    cfg.training.train_iters = 10 ** 6
    cfg.optimizer.bf16 = True
    cfg.data.mock_data = True
    return cfg.validate()


def build_step(cfg: Config):
    import pretrain_gpt
    from megatron_lite import parallel_state, training
    from megatron_lite.kernels.registry import select_kernels
    select_kernels(cfg)  # fails here, naming the flag, if TE / fp8 cannot run on this machine
    if not parallel_state.model_parallel_is_initialized():
        training.initialize(cfg)
    model, optimizer, scheduler = training.setup_model_and_optimizer(cfg, partial(pretrain_gpt.model_provider, cfg))
    mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (mbs, seq))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(mbs, seq),
             "position_ids": torch.arange(seq).expand(mbs, seq).contiguous()}

    class Forever:
        def __iter__(self):
            return self

        def __next__(self):
            return batch

    def step() -> None:
        training.train_step(cfg, partial(pretrain_gpt.forward_step, cfg), [Forever()], model, optimizer, scheduler,
                            num_microbatches=cfg.num_microbatches, global_batch_size=cfg.training.global_batch_size)
    return step, sum(p.numel() for p in model[0].parameters())


def profile_step(step, steps: int = 2) -> dict[str, float]:
    """GPU time per category (ms per step) from torch.profiler's CUDA kernel events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0:
            continue
        name = event.key.lower()
        category = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        totals[category] += device_us / 1e3 / steps
    return dict(totals)


def run(args: argparse.Namespace, impl: str) -> dict:
    cfg = make_config(args, impl)
    step, params = build_step(cfg)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.steps
    tokens = cfg.training.global_batch_size * cfg.model.seq_length
    tflops = num_floating_point_operations(cfg, cfg.training.global_batch_size) / elapsed / 1e12
    peak = args.peak_tflops or detect_peak_tflops()
    return {"impl": impl + (f"+fp8 {cfg.model.fp8_format}" if cfg.model.fp8_format else ""), "params": params,
            "step_ms": elapsed * 1e3, "tok_s": tokens / elapsed, "tflops": tflops,
            "mfu": tflops / peak if peak else float("nan"), "profile": profile_step(step),
            "mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", nargs="+", default=["local", "transformer_engine"], choices=["local", "transformer_engine"])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--recompute", choices=["selective", "full"], default=None)
    parser.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None)
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_mfu.py needs a CUDA GPU (this machine has none); the CPU benchmarks are "
                 "bench_vs_reference.py and bench_activation_memory.py.")
    rows, profiles = [], []
    for impl in args.impl:
        try:
            r = run(args, impl)
        except ConfigError as error:  # e.g. TE not installed: say so and go on with the other rows
            rows.append(f"| {impl} | skipped: {error} | | | | | |")
            continue
        rows.append(f"| {r['impl']} | {r['params'] / 1e9:.2f}B | {r['step_ms']:.0f} | {r['tok_s']:.0f} | {r['tflops']:.1f} "
                    f"| {r['mfu']:.1%} | {r['mem_gb']:.1f} |")
        total = sum(r["profile"].values())
        parts = ", ".join(f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in sorted(r["profile"].items(), key=lambda kv: -kv[1]))
        profiles.append(f"- {r['impl']}: GPU busy {total:.0f} of {r['step_ms']:.0f} ms per step: {parts}")
    device = torch.cuda.get_device_name()
    header = (f"{device}, torch {torch.__version__}; GPT {args.layers}x{args.hidden}, {args.heads} heads, seq {args.seq}, "
              f"micro-batch {args.micro_batch}, global batch {args.global_batch}, bf16, recompute {args.recompute or 'none'}")
    lines = ["| impl | params | ms/step | tokens/s | TFLOP/s | MFU | max mem GB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    text = header + "\n\n" + "\n".join(lines + rows) + "\n\n" + "\n".join(profiles) + "\n"
    print(text)
    if args.append_results:
        append_results(f"\n## GPU throughput and MFU (bench_gpu_mfu.py), {datetime.date.today()}\n\n{text}")


if __name__ == "__main__":
    main()
