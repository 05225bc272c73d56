"""Output layer + cross entropy: the unfused path (GEMM -> [tokens, vocab] logits -> vocab-parallel or torch
cross entropy) vs the fused one (kernels/linear_cross_entropy.py: GEMM and loss in token chunks, gradients
computed during forward), forward + backward, at TP = 1.

Reports the median time of each and the memory kept for backward beyond the inputs (x, weight, target):
bytes of the distinct storages autograd saves, counted with saved_tensors_hooks.

    OMP_NUM_THREADS=2 python benchmarks/bench_cross_entropy.py --append-results
    python benchmarks/bench_cross_entropy.py --tokens 8192 --hidden 4096 --vocab 128256   # on a GPU
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import report  # noqa: E402

from megatron_lite.kernels import fused  # noqa: E402
from megatron_lite.kernels.linear_cross_entropy import default_chunk_tokens, linear_cross_entropy  # noqa: E402
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402

PATHS = {
    "unfused, vocab-parallel CE": lambda x, w, t, mask: vocab_parallel_cross_entropy(x @ w.t(), t),
    "unfused, torch F.cross_entropy": lambda x, w, t, mask: fused.torch_cross_entropy(x @ w.t(), t),
    "fused_linear (default)": lambda x, w, t, mask: linear_cross_entropy(x, w, t, grad_weights=mask),
}


def saved_bytes(fn, x, w, t, mask) -> int:
    """Bytes autograd keeps for backward, beyond the storages of the inputs."""
    inputs = {x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr(), t.untyped_storage().data_ptr(),
              mask.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = fn(x, w, t, mask)
    ((loss * mask).sum() / mask.sum()).backward()
    return sum(seen.values())


def time_path(fn, x, w, t, mask, steps: int, sync) -> float:
    times = []
    for i in range(steps + 2):
        x.grad = w.grad = None
        start = time.perf_counter()
        loss = fn(x, w, t, mask)
        ((loss * mask).sum() / mask.sum()).backward()
        sync()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype_name in args.dtype:
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype).requires_grad_()
        w = (0.02 * torch.randn(args.vocab, args.hidden, generator=gen)).to(device, dtype).requires_grad_()
        t = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
        mask = (torch.rand(args.tokens, generator=gen) > 0.1).float().to(device)
        base = None
        for name, fn in PATHS.items():
            ms = time_path(fn, x, w, t, mask, args.steps, sync) * 1e3
            base = base or ms
            rows.append(f"| {dtype_name} | {name} | {ms:.1f} | {base / ms:.2f} | {saved_bytes(fn, x, w, t, mask) / 2**20:.1f} |")
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {args.threads} threads)"
    header = (f"{device_name}, torch {torch.__version__}; tokens={args.tokens} hidden={args.hidden} vocab={args.vocab}, "
              f"chunk {default_chunk_tokens(args.vocab, device)} tokens; median of {args.steps} forward+backward steps; "
              f"loss = masked mean (10 % of tokens masked)")
    lines = ["| dtype | path | ms | speed-up vs first row | MiB kept for backward (beyond inputs) |",
             "| --- | --- | --- | --- | --- |"] + rows
    report("Output layer + cross entropy (bench_cross_entropy.py)", header, lines, args.append_results)


if __name__ == "__main__":
    main()
