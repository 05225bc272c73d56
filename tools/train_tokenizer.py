#!/usr/bin/env python
"""Train a tokenizer on a JSONL corpus (no downloads).

    # SentencePiece BPE, 4096 pieces (the quickstart; ~1 s on the Shakespeare corpus):
    python tools/train_tokenizer.py --input data/shakespeare.jsonl --output-dir data/tokenizer
        -> data/tokenizer/tokenizer.model   (use --tokenizer-type SentencePieceTokenizer
                                             --tokenizer-model data/tokenizer/tokenizer.model)
    # GPT-2 style byte-level BPE:
    python tools/train_tokenizer.py --input data/shakespeare.jsonl --output-dir data/bpe \\
        --tokenizer-type GPT2BPETokenizer
        -> vocab.json + merges.txt (GPT2BPETokenizer) and tokenizer.json (HuggingFaceTokenizer)

SentencePiece is trained as BPE with byte fallback and identity normalisation, so
detokenize(tokenize(text)) == text for any UTF-8 text, newlines included. Ids 0/1/2 are
<unk>/<s>/</s>; </s> is the end-of-document token.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import time
from typing import Iterator


def iter_texts(patterns: list[str], keys: list[str]) -> Iterator[str]:
    """Texts under `keys` of every well-formed JSONL line; bad lines are skipped."""
    files = sorted({f for p in patterns for f in (glob.glob(p) or [p])})
    for path in files:
        if not os.path.exists(path):
            sys.exit(f"error: --input {path}: file not found")
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    continue
                if not isinstance(record, dict):
                    continue
                for key in keys:
                    if isinstance(record.get(key), str):
                        yield record[key]


def train_sentencepiece(texts: Iterator[str], output_dir: str, vocab_size: int, model_type: str, max_sentences: int) -> list[str]:
    import sentencepiece as spm

    def lines() -> Iterator[str]:
        # SentencePiece learns from "sentences"; lines of the documents are natural ones.
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    prefix = os.path.join(output_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,  # no <unk> for unseen characters
        normalization_rule_name="identity",  # keep text exactly, so detokenize round-trips
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],  # newlines survive tokenization
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return [prefix + ".model", prefix + ".vocab"]


def train_byte_level_bpe(texts: Iterator[str], output_dir: str, vocab_size: int) -> list[str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    files = tokenizer.model.save(output_dir)  # vocab.json, merges.txt
    json_path = os.path.join(output_dir, "tokenizer.json")
    tokenizer.save(json_path)
    return list(files) + [json_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files (globs and .gz allowed)")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--tokenizer-type",
        default="SentencePieceTokenizer",
        choices=("SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"),
        help="SentencePieceTokenizer -> tokenizer.model; the other two -> byte-level BPE files",
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece algorithm (bpe trains ~10x faster)")
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="SentencePiece: sample at most this many lines")
    args = parser.parse_args(argv)

    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    texts = iter_texts(args.input, args.json_keys)
    if args.tokenizer_type == "SentencePieceTokenizer":
        files = train_sentencepiece(texts, args.output_dir, args.vocab_size, args.model_type, args.max_sentences)
    else:
        files = train_byte_level_bpe(texts, args.output_dir, args.vocab_size)
    print(f"trained {args.tokenizer_type} (vocab {args.vocab_size}) in {time.perf_counter() - start:.1f}s: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
