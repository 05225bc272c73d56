"""Mixture of experts on CPU (gloo): all-to-all bytes against theory, one MoE layer against a dense MLP of the
same active FLOPs (grouped GEMM and loop), and a quickstart-sized MoE run on the Shakespeare corpus next to
the dense model with the same active parameters.

- Bytes: one MoE layer (E experts, top-k, hidden h) forward + backward at EP = world with the alltoall
  dispatcher, T tokens per rank. Theory for dropless top-k routing with ETP 1: every (token, expert) pair
  crosses the dispatcher four times (dispatch and combine, forward and backward), T * k * h * 4 bytes (fp32)
  each, counted as the bytes each rank hands to all_to_all_single (its own block included). A rank sends its
  own T k pairs out and its experts' received pairs back, so the per-rank figure varies with the routing
  and the mean over ranks equals the theory exactly; plus the tokens-per-expert all-gather (E int64 per rank). Measured = collectives' count for the 'tp_ep' group.
- Time: median over --repeats of forward + backward of one MoE layer (8 experts, top-2, moe-ffn F) and of a
  dense SwiGLU MLP of ffn 2F (the same expert FLOPs per token), one process.
- Loss curves: pretrain_gpt.py on the Shakespeare corpus (the quickstart's data and tokenizer) at
  TP2 x EP2 x PP2 (MoE: 8 experts of ffn 256, top-2) and TP2 x PP2 x DP2 (dense: ffn 512), both without
  linear biases; the same active parameters per token (the router adds 8 x 128).

    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py --append-results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import append_results  # noqa: E402

from megatron_lite import collectives  # noqa: E402
from megatron_lite import parallel_state as ps  # noqa: E402
from megatron_lite.arguments import parse  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402

DATE = "2026-12-02"


def layer_config(world: int, hidden: int, ffn: int, experts: int, topk: int, grouped: bool, ep: int):
    return parse(["--num-layers", "1", "--hidden-size", str(hidden), "--num-attention-heads", "4", "--vocab-size", "64",
                  "--disable-bias-linear", "--swiglu", "--ffn-hidden-size", str(2 * ffn), "--num-experts", str(experts),
                  "--moe-router-topk", str(topk), "--moe-ffn-hidden-size", str(ffn), "--expert-model-parallel-size",
                  str(ep), "--moe-token-dispatcher-type", "alltoall"] + (["--moe-grouped-gemm"] if grouped else []),
                 world_size=world)


def _bytes(world: int, tokens: int, hidden: int, experts: int, topk: int) -> dict:
    from megatron_lite.models.moe.moe_layer import MoELayer
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    cfg = layer_config(world, hidden, 64, experts, topk, False, world)
    layer = MoELayer(cfg, ps.get_process_groups())
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(tokens, 1, hidden, generator=torch.Generator().manual_seed(ps.get_process_groups().world.rank),
                    requires_grad=True)
    collectives.reset_comm_stats()
    layer(x).sum().backward()
    name = ps.get_process_groups().tp_ep.name
    return {"all_to_all": collectives.bytes_for(op="all_to_all", group=name),
            "all_gather": collectives.bytes_for(op="all_gather", group=name)}


def bytes_table(args) -> list[str]:
    lines = ["| EP | tokens/rank | top-k | measured all-to-all B/rank | theory 4 T k h x 4 B | counts all-gather B |",
             "| --- | --- | --- | --- | --- | --- |"]
    for world in (2, 4):
        for topk in (1, 2):
            result = run_distributed(_bytes, world, world=world, tokens=args.tokens_bytes, hidden=args.hidden, experts=8, topk=topk)
            theory = 4 * args.tokens_bytes * topk * args.hidden * 4
            measured = [r["all_to_all"] for r in result]
            # A rank sends its own T k pairs out and its experts' received pairs back: the mean over ranks is exact.
            assert sum(measured) == world * theory, (measured, theory)
            lines.append(f"| {world} | {args.tokens_bytes} | {topk} | {sum(measured) / world:,.0f} (mean; ranks "
                         f"{min(measured):,}-{max(measured):,}) | {theory:,} | {result[0]['all_gather']:,} |")
    return lines


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_table(args) -> list[str]:
    from megatron_lite.models.gpt.mlp import MLP
    from megatron_lite.models.moe.moe_layer import MoELayer
    from megatron_lite.process_groups import ProcessGroups
    torch.manual_seed(0)
    x = torch.randn(args.tokens, 1, args.hidden)
    rows, dense_time = [], None
    for label, grouped in (("dense MLP (ffn 2F)", None), ("MoE, loop of GEMMs", False), ("MoE, grouped GEMM", True)):
        cfg = layer_config(1, args.hidden, args.ffn, 8, 2, bool(grouped), 1)
        module = MLP(cfg, ProcessGroups.single().tp) if grouped is None else MoELayer(cfg, ProcessGroups.single())
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
        inp = x.clone().requires_grad_()

        def step():
            module.zero_grad(set_to_none=True)
            module(inp).sum().backward()
        seconds = _time(step, args.repeats)
        dense_time = dense_time or seconds
        rows.append(f"| {label} | {seconds * 1000:.1f} | {seconds / dense_time:.2f}x |")
    header = ["| layer (fwd + bwd, {} tokens, h {}, F {}) | ms | vs dense |".format(args.tokens, args.hidden, args.ffn),
              "| --- | --- | --- |"]
    return header + rows


def _pretrain(args, name: str, extra: list[str]) -> list[dict]:
    metrics = os.path.join(args.workdir, f"{name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
           os.path.join(ROOT, "pretrain_gpt.py"), "--config", os.path.join(ROOT, "configs/tiny_cpu.yaml"),
           "--data-path", args.data_prefix, "--data-cache-path", os.path.join(args.workdir, "cache"),
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", args.tokenizer,
           "--train-iters", str(args.iters), "--eval-interval", str(args.iters), "--log-interval", "10",
           "--disable-bias-linear", "--swiglu", "--metrics-jsonl", metrics, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in open(metrics) if "lm_loss" in line and '"split"' not in line]


def loss_table(args) -> list[str]:
    dense = _pretrain(args, "dense", ["--ffn-hidden-size", "512"])
    moe = _pretrain(args, "moe", ["--ffn-hidden-size", "512", "--num-experts", "8", "--moe-router-topk", "2",
                                  "--moe-ffn-hidden-size", "256", "--expert-model-parallel-size", "2",
                                  "--moe-token-dispatcher-type", "alltoall", "--moe-aux-loss-coeff", "0.01",
                                  "--moe-grouped-gemm"])
    lines = ["| iteration | dense lm loss (TP2 x PP2 x DP2) | MoE lm loss (TP2 x EP2 x PP2) | MoE balancing loss | "
             "MoE load imbalance |", "| --- | --- | --- | --- | --- |"]
    for d, m in zip(dense, moe):
        lines.append(f"| {d['iteration']} | {d['lm_loss']:.3f} | {m['lm_loss']:.3f} | "
                     f"{m.get('load_balancing_loss', float('nan')):.3f} | {m.get('expert_load_imbalance', float('nan')):.2f} |")
    step = lambda rs: statistics.median(r["elapsed_time_per_iteration_ms"] for r in rs[1:])  # noqa: E731
    lines.append(f"| ms/iteration (median) | {step(dense):.0f} | {step(moe):.0f} | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512, help="each expert's ffn (the dense MLP gets 2x)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--tokens-bytes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--data-prefix", default=os.path.join(ROOT, "data", "shakespeare_text_document"))
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "tokenizer", "tokenizer.model"))
    parser.add_argument("--workdir", default="/tmp/bench_moe")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), torch {torch.__version__}, gloo"
    sections = [("All-to-all bytes per MoE layer step vs theory", bytes_table(args)),
                ("One MoE layer (8 experts, top-2) vs a dense MLP of the same active FLOPs", timing_table(args))]
    if not args.skip_training:
        sections.append((f"Shakespeare, quickstart model ({args.iters} iterations): MoE next to dense", loss_table(args)))
    text = f"\n## Mixture of experts (bench_moe.py), {DATE}\n\nMachine: {machine}.\n"
    for title, lines in sections:
        text += f"\n{title}:\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.append_results:
        append_results(text)


if __name__ == "__main__":
    main()
