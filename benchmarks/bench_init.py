"""Initialisation at scale: peak memory per rank and time to build the model / to the first step, for
the chunked layout-invariant draw (tensor_parallel/utils.py) against the previous full-tensor draw.

    python benchmarks/bench_init.py [--world 8] [--layers 24] [--step-layers 6] [--append]

GPT-1.3B's shape (hidden 2048, 16 heads, FFN 8192, vocab 50257, `--layers` layers) on `--world` gloo
processes with TP = world, one thread each. "full draw" sets INIT_CHUNK_ELEMENTS beyond every tensor, which
is exactly the previous code path (every rank draws each full tensor, then keeps its shard); "chunked" is
the default (16 MiB chunks, stop after the last needed row). Per rank: the peak RSS growth while the model
is built (sampled every 2 ms), and the build time. Then, with `--step-layers` layers (the 1.3B shape with
fewer layers: the full 24 layers' weights, gradients and Adam states, 16 bytes/param, do not fit this
machine's memory in 8 processes), the time from the start of the model build to the end of the first
training step (DDP, Adam, one micro-batch of 128 tokens), and that process's peak RSS.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite import parallel_state as ps  # noqa: E402
from megatron_lite.config import Config  # noqa: E402
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads  # noqa: E402
from megatron_lite.models.gpt import GPTModel  # noqa: E402
from megatron_lite.optimizer import get_megatron_optimizer  # noqa: E402
from megatron_lite.tensor_parallel import utils  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402

from bench_checkpoint import PeakRSS  # noqa: E402

SEQ, VOCAB = 128, 50257


def _config(world: int, layers: int, shape: tuple[int, int, int]) -> Config:
    hidden, ffn, vocab = shape
    cfg = Config(world_size=world)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size = layers, hidden, max(1, hidden // 128), ffn
    m.seq_length, m.max_position_embeddings, m.vocab_size = SEQ, SEQ, vocab
    m.hidden_dropout = m.attention_dropout = 0.0
    cfg.parallel.tensor_model_parallel_size = world
    cfg.training.micro_batch_size = cfg.training.global_batch_size = 1
    return cfg.validate()


def _rank(world: int, layers: int, shape: tuple, chunked: bool, step: bool) -> dict:
    if not chunked:
        utils.INIT_CHUNK_ELEMENTS = 1 << 62  # every tensor takes the full-draw path: the previous behaviour
    cfg = _config(world, layers, shape)
    ps.initialize_model_parallel(world, 1)
    groups = ps.get_process_groups()
    torch.distributed.barrier()
    start = time.perf_counter()
    with PeakRSS() as build:
        model = GPTModel(cfg, groups=groups)
    out = {"build_s": build.seconds, "build_extra_mib": build.extra_mib,
           "local_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    if step:
        ddp = DistributedDataParallel(cfg, model, groups=groups)
        optimizer = get_megatron_optimizer(cfg, [ddp], groups)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, SEQ + 1), generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        ddp(tokens[:, :-1], torch.arange(SEQ).expand(1, SEQ), None, tokens[:, 1:]).mean().backward()
        finalize_model_grads([ddp], groups)
        optimizer.step()
        out["first_step_s"] = time.perf_counter() - start
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ps.destroy_model_parallel()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--step-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--append", action="store_true", help="Append the tables to benchmarks/RESULTS.md.")
    args = parser.parse_args(argv)
    shape = (args.hidden, args.ffn, args.vocab)
    lines = ["| init | layers | local weights MiB/rank | build s (slowest rank) | peak extra MiB/rank during build (max) |"
             " first step s (slowest rank) | peak RSS MiB/rank (max) |", "|" + "---|" * 7]
    for layers, step in ((args.layers, False), (args.step_layers, True)):
        for chunked in (False, True):
            outs = run_distributed(_rank, args.world, timeout=3600, world=args.world, layers=layers, shape=shape,
                                   chunked=chunked, step=step)
            first = f"{max(o['first_step_s'] for o in outs):.1f}" if step else "-"
            peak = f"{max(o['peak_rss_mib'] for o in outs):.0f}" if step else "-"
            lines.append(f"| {'chunked' if chunked else 'full draw (before)'} | {layers} | {outs[0]['local_mib']:.0f} | "
                         f"{max(o['build_s'] for o in outs):.1f} | {max(o['build_extra_mib'] for o in outs):.0f} | "
                         f"{first} | {peak} |")
            print(lines[-1], flush=True)
    header = (f"GPT shape hidden {args.hidden}, FFN {args.ffn}, {max(1, args.hidden // 128)} heads, vocab {args.vocab} "
              f"(GPT-1.3B: 2048, 8192, 16, 50257), fp32, TP {args.world} on {args.world} "
              f"gloo processes (one thread each); {platform.machine()}, {os.cpu_count()} CPU cores shared with other "
              f"jobs, torch {torch.__version__}. The first-step rows use {args.step_layers} layers: 24 layers with "
              "Adam (16 bytes/param, 21 GB in all) do not fit this 24 GiB machine in 8 processes.")
    from results import report
    report("Initialisation at scale: chunked vs full-tensor draw", header, lines, args.append)


if __name__ == "__main__":
    main()
