"""Context parallelism on CPU (gloo): activation memory per rank vs sequence length for CP 1/2/4, the
longest sequence within a per-rank activation budget, step time per comm type, and how much of the
ring's communication is hidden behind its block attention.

- Activation memory: bytes of distinct storages autograd saves during one forward of the model (the
  method of bench_activation_memory.py), on CP rank 0; ring attention (p2p) saves only q, k, v, output and
  a log-sum-exp per row, so it should fall as 1/CP.
- Step time: forward + backward of the model, median of --repeats after one warm-up, max over CP ranks.
- Ring overlap: one attention forward + backward with the K/V exchange overlapped (the default) and
  serialised (each exchange waited before its block); the block attention's own time is measured by
  timing ring.block_forward/block_backward. Exposed communication = overlapped - compute; total
  communication = serialised - compute; hidden = 1 - exposed / total.

    OMP_NUM_THREADS=1 python benchmarks/bench_context_parallel.py --append-results
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_activation_memory import SavedBytes  # noqa: E402
from results import report  # noqa: E402

from megatron_lite import parallel_state as ps  # noqa: E402
from megatron_lite.config import Config  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402


def make_config(args: argparse.Namespace, seq: int, cp: int, comm: str) -> Config:
    cfg = Config(world_size=cp)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = args.layers, args.hidden, args.heads, seq
    m.vocab_size, m.max_position_embeddings = 256, seq
    m.hidden_dropout = m.attention_dropout = 0.0
    cfg.parallel.context_parallel_size, cfg.parallel.cp_comm_type = cp, comm
    return cfg.validate()


def _model_and_batch(args, seq: int, cp: int, comm: str):
    from megatron_lite.context_parallel import slice_batch_for_cp
    from megatron_lite.models.gpt import GPTModel
    groups = ps.get_process_groups()
    model = GPTModel(make_config(args, seq, cp, comm), groups=groups)
    ids = torch.randint(0, 256, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = slice_batch_for_cp({"tokens": ids[:, :-1], "labels": ids[:, 1:], "position_ids": None}, groups.cp)
    return model, batch


def _activation_bytes(args, seq: int, cp: int) -> int:
    model, batch = _model_and_batch(args, seq, cp, "p2p")
    counter = SavedBytes(list(model.parameters()))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = model(batch["tokens"], labels=batch["labels"])
    del loss
    return counter.total


def _step_time(args, seq: int, cp: int, comm: str) -> float:
    model, batch = _model_and_batch(args, seq, cp, comm)
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        model(batch["tokens"], labels=batch["labels"]).mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _ring_overlap(args, seq: int) -> dict:
    from megatron_lite.context_parallel import ring
    group = ps.get_process_groups().cp
    local, head_dim = seq // group.size, args.hidden // args.heads
    generator = torch.Generator().manual_seed(group.rank)
    q, k, v = (torch.randn(1, args.heads, local, head_dim, generator=generator, requires_grad=True) for _ in range(3))
    compute = [0.0]
    originals = ring.block_forward, ring.block_backward

    def timed(fn):
        def run(*a):
            start = time.perf_counter()
            out = fn(*a)
            compute[0] += time.perf_counter() - start
            return out
        return run
    ring.block_forward, ring.block_backward = timed(originals[0]), timed(originals[1])
    result = {}
    try:
        for overlap in (True, False, True, False):
            compute[0] = 0.0
            start = time.perf_counter()
            ring.ring_attention(q, k, v, None, group, overlap=overlap).sum().backward()
            result[overlap] = (time.perf_counter() - start, compute[0])  # the second of each kept (warm)
    finally:
        ring.block_forward, ring.block_backward = originals
    return result


def _rank_measure(args, cp: int, seqs: list[int], time_seqs: list[int]) -> dict:
    if cp > 1:
        ps.initialize_model_parallel(context_parallel_size=cp)
    else:
        ps.initialize_model_parallel()
    out = {"memory": {s: _activation_bytes(args, s, cp) for s in seqs}, "time": {}, "overlap": {}}
    comms = ("p2p", "all_gather", "a2a") if cp > 1 else ("p2p",)
    for seq in time_seqs:
        for comm in comms:
            out["time"][(seq, comm)] = _step_time(args, seq, cp, comm)
        if cp > 1:
            out["overlap"][seq] = _ring_overlap(args, seq)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--memory-seqs", default="2048,4096,8192,16384")
    parser.add_argument("--time-seqs", default="4096,8192")
    parser.add_argument("--cps", default="1,2,4")
    parser.add_argument("--budget-mib", type=float, default=64.0, help="Per-rank activation budget.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    seqs, time_seqs = [int(s) for s in args.memory_seqs.split(",")], [int(s) for s in args.time_seqs.split(",")]
    cps = [int(c) for c in args.cps.split(",")]
    measured = {cp: run_distributed(_rank_measure, cp, timeout=3600, args=args, cp=cp, seqs=seqs, time_seqs=time_seqs)
                for cp in cps}
    _report(args, measured, seqs, time_seqs, cps)


def _report(args, measured: dict, seqs: list[int], time_seqs: list[int], cps: list[int]) -> None:
    mib = 2.0 ** 20
    lines = ["| CP | " + " | ".join(f"seq {s}" for s in seqs) + f" | longest seq within {args.budget_mib:g} MiB |",
             "|---:|" + "---:|" * (len(seqs) + 1)]
    for cp in cps:
        memory = measured[cp][0]["memory"]
        fits = [s for s in seqs if memory[s] / mib <= args.budget_mib]
        lines.append(f"| {cp} | " + " | ".join(f"{memory[s] / mib:.1f} MiB" for s in seqs)
                     + f" | {max(fits) if fits else '< ' + str(min(seqs))} |")
    lines += ["", "| CP | seq | comm | step time (s) | ring: overlapped / serialised / block compute (s) | comm hidden |",
              "|---:|---:|---|---:|---|---:|"]
    for cp in cps:
        for (seq, comm) in measured[cp][0]["time"]:
            step = max(r["time"][(seq, comm)] for r in measured[cp])
            ring_cell, hidden_cell = "", ""
            if comm == "p2p" and cp > 1:
                over, serial = measured[cp][0]["overlap"][seq][True], measured[cp][0]["overlap"][seq][False]
                total, exposed = serial[0] - serial[1], over[0] - over[1]
                ring_cell = f"{over[0]:.3f} / {serial[0]:.3f} / {over[1]:.3f}"
                hidden_cell = f"{100 * (1 - exposed / total):.0f}%" if total > 0 else "n/a"
            lines.append(f"| {cp} | {seq} | {comm} | {step:.3f} | {ring_cell} | {hidden_cell} |")
    header = (f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, batch 1, fp32, gloo on this machine's "
              f"CPUs (shared); activation bytes saved for backward on CP rank 0 (ring attention); "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}")
    report("Context parallelism (bench_context_parallel.py)", header, lines, args.append_results)


if __name__ == "__main__":
    main()
