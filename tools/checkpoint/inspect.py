"""Print what a megatron_lite checkpoint holds: iteration, layout, model settings, every parameter's
name, full shape, dtype, sharding and L2 norm, and whether optimizer state is present.

    python tools/checkpoint/inspect.py ./ckpt                       # the latest iteration
    python tools/checkpoint/inspect.py --load-dir ./ckpt/iter_0000100 --no-norms --json
    python tools/checkpoint/inspect.py ./ckpt --verify               # sizes and CRC-32s against the manifest

Reads one full tensor at a time (CheckpointReader), so it works offline on any checkpoint size.
"""
from __future__ import annotations

import os
import sys

# This directory holds a file named inspect.py; drop it from the import path before anything imports
# the standard library's inspect (torch, dataclasses do).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import json
from typing import Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_lite.checkpoint_io import CheckpointError, CheckpointReader  # noqa: E402

MODEL_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
              "seq_length", "position_embedding_type", "normalization", "swiglu", "untie_embeddings_and_output_weights")


def _sharding(spec) -> str:
    if not spec.is_sharded:
        return "replicated"
    return f"dim {spec.partition_dim}" + (f", stride {spec.stride}" if spec.stride > 1 else "")


def summarize(path: str, norms: bool = True) -> dict:
    """Everything inspect prints, as a dict (also what --json writes)."""
    with CheckpointReader(path) as reader:
        model = reader.config.get("model", {})
        params = []
        total = 0
        for name, meta in sorted(reader.param_meta().items()):
            numel = 1
            for size in meta.shape:
                numel *= size
            total += numel
            entry = {"name": name, "shape": meta.shape, "dtype": meta.dtype, "sharding": _sharding(meta.shard),
                     "pp_rank": meta.pp_rank}
            if norms:
                entry["norm"] = float(reader.full_tensor(name).float().norm())
            params.append(entry)
        common = reader.common() if reader.has_optimizer() else {}
        return {"path": reader.path, "iteration": reader.iteration, "consumed_samples": reader.consumed_samples,
                "layout": reader.layout, "model": {k: model.get(k) for k in MODEL_KEYS if k in model},
                "has_optimizer": reader.has_optimizer(), "has_lr_scheduler": "opt_param_scheduler" in common,
                "num_parameters": total, "params": params}


def print_summary(info: dict) -> None:
    layout = info["layout"]
    print(f"checkpoint:      {info['path']}")
    print(f"iteration:       {info['iteration']}  (consumed samples {info['consumed_samples']})")
    print(f"layout:          TP={layout.get('tp')} PP={layout.get('pp')} VP={layout.get('vp')} DP={layout.get('dp')} "
          f"world={layout.get('world_size')} distributed_optimizer={layout.get('distributed_optimizer')}")
    print("model:           " + ", ".join(f"{k}={v}" for k, v in info["model"].items()))
    print(f"optimizer state: {'present' if info['has_optimizer'] else 'absent'}"
          f"{' (with LR scheduler)' if info['has_lr_scheduler'] else ''}")
    print(f"parameters:      {len(info['params'])} tensors, {info['num_parameters']:,} values")
    width = max((len(p["name"]) for p in info["params"]), default=10)
    print(f"\n{'name':<{width}}  {'shape':<14} {'dtype':<9} {'sharding':<18} {'pp':>2}  norm")
    for p in info["params"]:
        norm = f"{p['norm']:.6g}" if "norm" in p else "-"
        print(f"{p['name']:<{width}}  {str(p['shape']):<14} {p['dtype']:<9} {p['sharding']:<18} {p['pp_rank']:>2}  {norm}")


def verify(path: str) -> int:
    """Check every file the manifest lists (size, then CRC-32); 0 if all match, 1 otherwise."""
    with CheckpointReader(path) as reader:
        if not reader.has_checksums:
            print(f"{reader.path} (iteration {reader.iteration}) was written before checkpoints recorded checksums: "
                  "nothing to verify (re-save it to add them).")
            return 0
        names = set(reader.metadata["files"]) | {f for meta in reader.param_meta().values() for f in meta.shard_files("model")}
        problems = reader.verify(names)
        for problem in problems:
            print(f"DAMAGED: {problem}")
        if problems:
            return 1
        print(f"{reader.path} (iteration {reader.iteration}): all {len(names)} files match the manifest.")
        return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("path", nargs="?", help="A --save directory or one of its iter_NNNNNNN directories.")
    parser.add_argument("--load-dir", help="Same as the positional path (Megatron's spelling).")
    parser.add_argument("--no-norms", action="store_true", help="Skip reading tensors (names and shapes only).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    parser.add_argument("--verify", action="store_true",
                        help="Check every file's size and CRC-32 against metadata.json; exit 1 if any differs.")
    args = parser.parse_args(argv)
    path = args.load_dir or args.path
    if path is None:
        parser.error("give the checkpoint directory (positional or --load-dir)")
    try:
        if args.verify:
            return verify(path)
        info = summarize(path, norms=not args.no_norms)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print_summary(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
