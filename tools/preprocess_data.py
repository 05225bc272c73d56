#!/usr/bin/env python
"""Tokenize JSONL into Megatron `.bin/.idx` files (Megatron-LM's flags).

    python tools/preprocess_data.py --input data/shakespeare.jsonl \\
        --output-prefix data/shakespeare --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/tokenizer/tokenizer.model --append-eod --workers 2
        -> data/shakespeare_text_document.bin / .idx   (use --data-path data/shakespeare_text_document)

Input: JSONL files, `.gz` allowed, globs allowed. Every line is one document; malformed JSON,
non-UTF-8 lines and missing keys are skipped and counted in the summary. Lines are sent to a
pool of `--workers` processes in batches (one tokenizer per worker, one batched tokenizer call
per batch) and written back in input order, so the output does not depend on --workers.
Files are written under a temporary name and renamed when complete.

--split-sentences (Megatron's flag) stores each document as several sequences, one per sentence, in
`{prefix}_{key}_sentence.bin/.idx` (the end-of-document token, with --append-eod, ends the last one).
Megatron splits with NLTK's punkt model, which must be downloaded; megatron_lite splits after `.`, `!`
or `?` (and any closing quotes/brackets) followed by whitespace, which needs no download and agrees
with punkt on ordinary prose (abbreviations such as "Dr." are where they differ). --keep-newlines
keeps the newlines that follow a sentence at its end (Megatron's CustomLanguageVars) instead of
dropping all whitespace between sentences.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import gzip
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Iterator

import numpy as np

# Allow running as `python tools/preprocess_data.py` from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.indexed_dataset import (  # noqa: E402
    builder_for_prefix, data_file_path, finalize_prefix, index_file_path, merge_indexed_datasets, optimal_dtype)
from megatron_lite.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

LINES_PER_BATCH = 128
_COUNTERS = ("documents", "bytes", "malformed_json", "non_utf8", "missing_key", "empty")

_worker_state: dict = {}
# A sentence ends at . ! or ? plus any closing quotes/brackets; the whitespace after it separates sentences.
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])([\"')\]\u201d\u2019]*)(\s+)")


def split_sentences(text: str, keep_newlines: bool = False) -> list[str]:
    """`text` cut into sentences (see the module doc); with keep_newlines each sentence keeps the newlines
    that followed it, else sentences are stripped of surrounding whitespace. Empty pieces are dropped."""
    sentences, start = [], 0
    for match in _SENTENCE_BOUNDARY.finditer(text):
        end = match.end(1)
        tail = "\n" * match.group(2).count("\n") if keep_newlines else ""
        sentences.append(text[start:end] + tail)
        start = match.end()
    sentences.append(text[start:])
    if keep_newlines:
        return [s for s in sentences if s.strip()]
    return [s.strip() for s in sentences if s.strip()]


def _init_worker(tokenizer_kwargs: dict, keys: list[str], append_eod: bool, split: bool = False,
                 keep_newlines: bool = False) -> None:
    # One tokenizer per worker process, built once. Each worker tokenizes on a single thread so
    # that --workers is the real degree of parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    _worker_state.update(tokenizer=tokenizer, keys=keys, append_eod=append_eod, dtype=optimal_dtype(tokenizer.vocab_size),
                         split=split, keep_newlines=keep_newlines)


def encode_batch(lines: list[bytes]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], dict[str, int]]:
    """Tokenize a batch of raw JSONL lines -> ({key: (tokens, sequence lengths, sequences per document
    or None when every document is one sequence)}, counters)."""
    tokenizer, keys = _worker_state["tokenizer"], _worker_state["keys"]
    counts = dict.fromkeys(_COUNTERS, 0)
    texts: dict[str, list[str]] = {key: [] for key in keys}
    for raw in lines:
        if not raw.strip():
            counts["empty"] += 1
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            counts["non_utf8"] += 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            counts["malformed_json"] += 1
            continue
        if not isinstance(record, dict):
            counts["malformed_json"] += 1
            continue
        counts["bytes"] += len(raw)
        counts["documents"] += 1
        for key in keys:
            value = record.get(key)
            if isinstance(value, str):
                texts[key].append(value)
            else:
                counts["missing_key"] += 1
    out = {}
    dtype = _worker_state["dtype"]
    for key in keys:
        if _worker_state["split"]:
            out[key] = _encode_sentences(tokenizer, texts[key], dtype)
            continue
        ids = tokenizer.tokenize_batch(texts[key]) if texts[key] else []
        if _worker_state["append_eod"]:
            ids = [doc + [tokenizer.eod] for doc in ids]
        ids = [doc for doc in ids if doc]  # an empty document carries no tokens; drop it
        lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        out[key] = (flat, lengths, None)
    return out, counts


def _encode_sentences(tokenizer, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """--split-sentences: every document as its sentences' token lists (eod ends the last sentence)."""
    per_doc = [split_sentences(text, _worker_state["keep_newlines"]) for text in texts]
    flat_sentences = [s for doc in per_doc for s in doc]
    ids = iter(tokenizer.tokenize_batch(flat_sentences) if flat_sentences else [])
    sequences, counts = [], []
    for doc in per_doc:
        doc_ids = [next(ids) for _ in doc]
        doc_ids = [sentence for sentence in doc_ids if sentence]
        if _worker_state["append_eod"] and doc_ids:
            doc_ids[-1] = doc_ids[-1] + [tokenizer.eod]
        elif _worker_state["append_eod"]:
            doc_ids = [[tokenizer.eod]]
        if doc_ids:
            sequences.extend(doc_ids)
            counts.append(len(doc_ids))
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths, np.asarray(counts, dtype=np.int64)


def expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise SystemExit(f"error: --input {pattern}: no such file")
        files.extend(m for m in matches if m not in files)
    return files


def iter_line_batches(files: list[str]) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for raw in f:
                batch.append(raw)
                if len(batch) == LINES_PER_BATCH:
                    yield batch
                    batch = []
    if batch:
        yield batch


def output_prefix_for(output_prefix: str, key: str, level: str = "document") -> str:
    return f"{output_prefix}_{key}_{level}"


def process_files(files: list[str], prefixes: dict[str, str], args, tokenizer_kwargs: dict, dtype, pool, totals: dict) -> None:
    """Tokenize `files` into `{prefix}.bin/.idx` for each key (temporary names, renamed at the end)."""
    builders = {key: builder_for_prefix(p, dtype) for key, p in prefixes.items()}
    start = time.perf_counter()
    next_log = args.log_interval
    batches = iter_line_batches(files)
    results = pool.imap(encode_batch, batches, chunksize=1) if pool else map(encode_batch, batches)
    for encoded, counts in results:
        for key, (tokens, lengths, per_document) in encoded.items():
            if per_document is None:
                builders[key].add_documents(tokens, lengths)
                continue
            offset, first = 0, 0
            for count in per_document:  # one document of `count` sentences at a time
                doc_lengths = lengths[first:first + count]
                size = int(doc_lengths.sum())
                builders[key].add_document(tokens[offset:offset + size], doc_lengths)
                offset, first = offset + size, first + count
        for name, value in counts.items():
            totals[name] += value
        if args.log_interval and totals["documents"] >= next_log:
            elapsed = max(time.perf_counter() - start, 1e-9)
            print(
                f"Processed {totals['documents']} documents ({totals['documents'] / elapsed:.0f} docs/s, "
                f"{totals['bytes'] / elapsed / 1e6:.1f} MB/s).",
                file=sys.stderr,
                flush=True,
            )
            next_log = (totals["documents"] // args.log_interval + 1) * args.log_interval
    for key, prefix in prefixes.items():
        finalize_prefix(builders[key], prefix)


def merge_partitions(partition_prefixes: list[str], final_prefix: str, dtype) -> None:
    merge_indexed_datasets(partition_prefixes, final_prefix, dtype)
    for prefix in partition_prefixes:
        os.remove(data_file_path(prefix))
        os.remove(index_file_path(prefix))


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="JSONL file(s); globs and .gz allowed")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one output per key)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES + ("GPTSentencePieceTokenizer",))
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece .model, or tokenizer.json / its directory")
    group.add_argument("--vocab-file", default=None)
    group.add_argument("--merge-file", default=None)
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group.add_argument("--split-sentences", action="store_true",
                       help="store each document as sentences (writes {prefix}_{key}_sentence.bin/.idx)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the newlines after each sentence")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx (or _sentence)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = in this process)")
    group.add_argument(
        "--partitions", type=int, default=1, help="split the input files into this many groups, each written then merged"
    )
    group.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines (0 = none)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.partitions < 1:
        parser.error("--partitions must be >= 1")
    if args.keep_newlines and not args.split_sentences:
        parser.error("--keep-newlines only applies with --split-sentences")
    return args


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    files = expand_inputs(args.input)
    tokenizer_kwargs = dict(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
    )
    tokenizer = build_tokenizer(**tokenizer_kwargs)  # fail fast on a bad tokenizer, before forking
    dtype = optimal_dtype(tokenizer.vocab_size)
    del tokenizer
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)

    partitions = min(args.partitions, len(files))
    if partitions < args.partitions:
        print(f"note: {len(files)} input file(s), so --partitions {args.partitions} is reduced to {partitions}", file=sys.stderr)
    # Contiguous groups of files keep the document order of a single-partition run.
    bounds = np.linspace(0, len(files), partitions + 1).round().astype(int)
    groups = [files[bounds[i] : bounds[i + 1]] for i in range(partitions)]

    totals = dict.fromkeys(_COUNTERS, 0)
    start = time.perf_counter()
    init_args = (tokenizer_kwargs, args.json_keys, args.append_eod, args.split_sentences, args.keep_newlines)
    pool = None
    if args.workers > 1:
        # fork keeps start-up cheap; the parent never ran a tokenizer, so no thread pool is forked.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(args.workers, initializer=_init_worker, initargs=init_args)
    else:
        _init_worker(*init_args)
    try:
        level = "sentence" if args.split_sentences else "document"
        final = {key: output_prefix_for(args.output_prefix, key, level) for key in args.json_keys}
        if partitions == 1:
            process_files(groups[0], final, args, tokenizer_kwargs, dtype, pool, totals)
        else:
            parts = {key: [f"{p}.part{i}" for i in range(partitions)] for key, p in final.items()}
            for i, group in enumerate(groups):
                process_files(group, {key: parts[key][i] for key in final}, args, tokenizer_kwargs, dtype, pool, totals)
            for key, prefix in final.items():
                merge_partitions(parts[key], prefix, dtype)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    elapsed = max(time.perf_counter() - start, 1e-9)
    skipped = totals["malformed_json"] + totals["non_utf8"] + totals["empty"]
    print(
        f"Done: {totals['documents']} documents, {totals['bytes'] / 1e6:.1f} MB in {elapsed:.2f}s "
        f"({totals['documents'] / elapsed:.0f} docs/s, {totals['bytes'] / elapsed / 1e6:.1f} MB/s); "
        f"skipped {skipped} lines ({totals['malformed_json']} malformed JSON, {totals['non_utf8']} non-UTF-8, "
        f"{totals['empty']} empty), {totals['missing_key']} missing keys. Output: "
        + ", ".join(f"{p}.bin/.idx" for p in final.values())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
