"""Framework overhead: training-step tokens/s of megatron_lite (TP = PP = DP = 1) vs a plain-PyTorch
nanoGPT-style GPT of the same shape (benchmarks/nanogpt_reference.py), on CPU with a fixed thread count.

megatron_lite runs its real training path: GPTModel built by pretrain_gpt.model_provider, wrapped in
DistributedDataParallel, MegatronOptimizer (fp32 main weights, clipping), the no-pipelining schedule and
training.train_step, on a world of one gloo process. The reference runs nanoGPT's step (autocast for bf16,
fused AdamW, clip_grad_norm_). Both use dropout 0 and the same batch. Steps of the two alternate, so
machine noise (other jobs on a shared box) hits both alike; the ratio is of median step times.

    OMP_NUM_THREADS=2 python benchmarks/bench_vs_reference.py --dtype fp32 bf16 --append-results
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import report  # noqa: E402  (benchmarks/ is the script's own folder)

from nanogpt_reference import NanoGPT, RefConfig, make_optimizer, train_step as ref_train_step  # noqa: E402

from megatron_lite.config import Config  # noqa: E402


def make_config(args: argparse.Namespace, bf16: bool) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = args.layers, args.hidden, args.heads
    m.seq_length, m.vocab_size = args.seq, args.vocab
    m.hidden_dropout = m.attention_dropout = 0.0
    m.torch_compile = args.torch_compile
    cfg.training.micro_batch_size = cfg.training.global_batch_size = args.batch
    cfg.training.train_iters = 10 ** 6
    cfg.optimizer.bf16 = bf16
    cfg.optimizer.lr, cfg.optimizer.clip_grad, cfg.optimizer.weight_decay = 1e-4, 1.0, 0.01
    cfg.data.mock_data = True
    return cfg.validate()


def megatron_step_fn(cfg: Config, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[Callable[[], float], int]:
    """The real training step of megatron_lite at TP = PP = DP = 1."""
    import pretrain_gpt
    from megatron_lite import training

    from megatron_lite import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        training.initialize(cfg)  # a world of one gloo process
    model, optimizer, scheduler = training.setup_model_and_optimizer(cfg, partial(pretrain_gpt.model_provider, cfg))
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
             "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()}

    class Forever:
        def __iter__(self):
            return self

        def __next__(self):
            return batch

    iterators = [Forever()]
    step_fn = partial(pretrain_gpt.forward_step, cfg)

    def step() -> float:
        loss, ok, _, _ = training.train_step(cfg, step_fn, iterators, model, optimizer, scheduler,
                                             num_microbatches=1, global_batch_size=cfg.training.global_batch_size)
        return float(loss)

    params = sum(p.numel() for p in model[0].parameters())
    return step, params


def reference_step_fn(cfg: Config, tokens: torch.Tensor, labels: torch.Tensor, bf16: bool) -> tuple[Callable[[], float], int]:
    m = cfg.model
    from megatron_lite.logging import padded_vocab_size
    ref_cfg = RefConfig(vocab_size=padded_vocab_size(cfg), seq_length=m.seq_length, num_layers=m.num_layers,
                        num_heads=m.num_attention_heads, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size)
    torch.manual_seed(0)
    model = NanoGPT(ref_cfg)
    optimizer = make_optimizer(model)
    dtype = torch.bfloat16 if bf16 else None
    return (lambda: ref_train_step(model, optimizer, tokens, labels, dtype)), sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace, dtype: str) -> dict:
    bf16 = dtype == "bf16"
    cfg = make_config(args, bf16)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    ml_step, ml_params = megatron_step_fn(cfg, tokens, labels)
    ref_step, ref_params = reference_step_fn(cfg, tokens, labels, bf16)
    for _ in range(args.warmup):
        ml_step(), ref_step()
    ml_times, ref_times = [], []
    for i in range(args.steps):
        # Alternate which goes first, so neither always runs right after the other's cache traffic.
        order = [(ml_step, ml_times), (ref_step, ref_times)]
        for fn, times in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    tokens_per_step = args.batch * args.seq
    ml, ref = statistics.median(ml_times), statistics.median(ref_times)
    # The best step of each is the least disturbed by other jobs on a shared machine: report both.
    return {"dtype": dtype, "params_ml": ml_params, "params_ref": ref_params,
            "ml_tok_s": tokens_per_step / ml, "ref_tok_s": tokens_per_step / ref, "ratio": ref / ml,
            "ml_ms": ml * 1e3, "ref_ms": ref * 1e3, "ratio_best": min(ref_times) / min(ml_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [run(args, dtype) for dtype in args.dtype]
    from megatron_lite.kernels.registry import select_kernels
    kernels = select_kernels(make_config(args, False)).describe()
    header = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads), "
              f"torch {torch.__version__}; GPT-2 style: layers={args.layers} hidden={args.hidden} heads={args.heads} "
              f"seq={args.seq} batch={args.batch} vocab={args.vocab}, dropout 0, median of {args.steps} alternating steps "
              f"after {args.warmup} warm-up; {kernels}")
    lines = ["| dtype | params (ml / ref) | megatron_lite tok/s | reference tok/s | ml ms/step | ref ms/step | ratio ml/ref (median) | ratio (best step) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['params_ml']:,} / {r['params_ref']:,} | {r['ml_tok_s']:.0f} | {r['ref_tok_s']:.0f} "
                     f"| {r['ml_ms']:.1f} | {r['ref_ms']:.1f} | {r['ratio']:.3f} | {r['ratio_best']:.3f} |")
    report("Framework overhead vs plain PyTorch (bench_vs_reference.py)", header, lines, args.append_results)


if __name__ == "__main__":
    main()
