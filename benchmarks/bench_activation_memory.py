"""Activation memory per transformer layer, measured, against Megatron's formulas (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", no tensor/sequence parallelism):

    no recompute         s b h (34 + 5 a s / h)   bytes (16-bit activations, 1-byte dropout masks)
    selective recompute  34 s b h                 (the attention core -- scores, softmax, dropout -- recomputed)
    full recompute       2 s b h                  (only the layer input is kept)

Measurement: every tensor autograd saves during one layer's forward (torch.autograd.graph.saved_tensors_hooks),
plus the inputs an activation checkpoint keeps, counted once per storage and excluding parameters.
The formula assumes the unfused attention (it stores the s x s scores); flash-style kernels keep only a
log-sum-exp per row, so without attention dropout the SDPA "none" row sits near the selective formula.
On CPU, SDPA with dropout falls back to its decomposed math path, which saves more than the formula.

    OMP_NUM_THREADS=2 python benchmarks/bench_activation_memory.py --append-results
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results import report  # noqa: E402  (benchmarks/ is the script's own folder)

from megatron_lite.config import Config  # noqa: E402
from megatron_lite.models.gpt import transformer  # noqa: E402
from megatron_lite.tensor_parallel.random import model_parallel_seed  # noqa: E402


class SavedBytes:
    """Bytes of distinct storages saved for backward (or kept by checkpoints), parameters excluded."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: dict[int, int] = {}

    def add(self, tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.exclude:
                self.storages[storage.data_ptr()] = storage.nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(cfg: Config, batch: int) -> int:
    m = cfg.model
    model_parallel_seed(1234)  # the TP-rank dropout stream attention dropout draws from
    block = transformer.TransformerBlock(cfg, [0], post_process=False)
    block.train()
    x = torch.randn(m.seq_length, batch, m.hidden_size, dtype=cfg.params_dtype, requires_grad=True)
    counter = SavedBytes(list(block.parameters()))
    original = transformer.checkpoint

    def counting_checkpoint(fn, *args):  # what a checkpoint keeps: its tensor inputs
        for arg in args:
            counter.add(arg)
        return original(fn, *args)

    transformer.checkpoint = counting_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            out = block(x)
    finally:
        transformer.checkpoint = original
    out.float().sum().backward()  # the graph is valid (and frees what it saved)
    return counter.total


def formula(mode: str, s: int, b: int, h: int, a: int) -> float:
    if mode == "none":
        return s * b * h * (34 + 5 * a * s / h)
    return 34 * s * b * h if mode == "selective" else 2 * s * b * h


def make_config(args: argparse.Namespace, recompute: Optional[str], attention_backend: str,
                attention_dropout: float = 0.1) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 1, args.hidden, args.heads, args.seq
    m.vocab_size, m.hidden_dropout, m.attention_dropout = 128, 0.1, attention_dropout
    m.recompute_granularity = recompute
    m.recompute_method = "uniform" if recompute == "full" else None
    m.attention_backend = attention_backend
    cfg.optimizer.bf16 = True  # 16-bit activations, as the formula assumes
    return cfg.validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    s, b, h, a = args.seq, args.batch, args.hidden, args.heads
    rows = []
    variants = [("unfused", 0.1, "unfused (matmul+softmax)"), ("auto", 0.1, "SDPA (registry default)"),
                ("auto", 0.0, "SDPA, attention dropout 0 (flash kernel)")]
    for backend, attention_dropout, label in variants:
        for mode in ("none", "selective", "full"):
            cfg = make_config(args, None if mode == "none" else mode, backend, attention_dropout)
            measured = measure(cfg, b)
            expected = formula(mode, s, b, h, a)
            rows.append(f"| {label} | {mode} | {measured / 2**20:.2f} | {expected / 2**20:.2f} | {measured / expected:.3f} "
                        f"| {measured / (s * b * h):.1f} |")
    header = (f"GPT-2-style layer, bf16, dropout 0.1, s={s} b={b} h={h} a={a}, no TP/SP; CPU, torch {torch.__version__}. "
              "Measured = bytes autograd saves in one layer's forward (+ checkpoint inputs), per distinct storage.")
    lines = ["| attention | recompute | measured MiB | formula MiB | measured/formula | measured bytes / sbh |",
             "| --- | --- | --- | --- | --- | --- |"] + rows
    report("Activation memory per layer (bench_activation_memory.py)", header, lines, args.append_results)


if __name__ == "__main__":
    main()
