#!/usr/bin/env python
"""Concatenate Megatron `.bin/.idx` datasets into one (Megatron-LM's tools/merge_datasets.py).

    python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab

--input is a directory (every `.idx`/`.bin` pair in it, sorted by name) or a list of prefixes.
All inputs must share a dtype (same tokenizer vocabulary size).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.indexed_dataset import IndexedDataset, data_file_path, exists, merge_indexed_datasets  # noqa: E402


def find_prefixes(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f[:-4]) for f in os.listdir(item) if f.endswith(".idx"))
            missing = [p for p in found if not os.path.exists(data_file_path(p))]
            if missing:
                sys.exit(f"error: {missing[0]}.idx has no matching .bin")
            prefixes.extend(found)
        else:
            prefix = item[:-4] if item.endswith((".bin", ".idx")) else item
            if not exists(prefix):
                sys.exit(f"error: --input {item}: {prefix}.bin/.idx not found")
            prefixes.append(prefix)
    if not prefixes:
        sys.exit("error: no datasets found in --input")
    return prefixes


def merge(prefixes: list[str], output_prefix: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    merge_indexed_datasets(prefixes, output_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="a directory of datasets, or dataset prefixes")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    prefixes = find_prefixes(args.input)
    merge(prefixes, args.output_prefix)
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}: {len(merged)} documents, {merged.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
