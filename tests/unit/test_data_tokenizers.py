"""Tokenizers built from tiny files trained in the test (never downloaded)."""

import os
import sys

import pytest

from megatron_lite.data.tokenizers import NullTokenizer, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_tokenizer  # noqa: E402

CORPUS = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
    "To be, or not to be, that is the question: café, naïve — 1234.",
    "All the world's a stage, and all the men and women merely players.",
] * 30
SAMPLE = "To be or not to be:\nthe winter's café 42 — ünïcode!"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    os.makedirs(root / "bpe")
    train_tokenizer.train_byte_level_bpe(iter(CORPUS), str(root / "bpe"), vocab_size=300)
    os.makedirs(root / "sp")
    train_tokenizer.train_sentencepiece(iter(CORPUS), str(root / "sp"), vocab_size=400, model_type="bpe", max_sentences=10000)
    return root


def test_gpt2_bpe_and_huggingface_round_trip(trained):
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(trained / "bpe/vocab.json"), merge_file=str(trained / "bpe/merges.txt"))
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(trained / "bpe"))
    for tok in (gpt2, hf):
        assert tok.vocab_size == 300
        assert tok.eod == 0  # <|endoftext|> is the first special token
        ids = tok.tokenize(SAMPLE)
        assert tok.detokenize(ids) == SAMPLE
        assert tok.tokenize_batch([SAMPLE, "York"]) == [ids, tok.tokenize("York")]
        assert max(ids) < tok.vocab_size and tok.eod not in ids
    assert gpt2.tokenize(SAMPLE) == hf.tokenize(SAMPLE)


def test_sentencepiece_round_trip_and_save(trained, tmp_path):
    sp = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(trained / "sp/tokenizer.model"))
    assert sp.vocab_size == 400 and sp.eod == 2
    ids = sp.tokenize(SAMPLE)
    assert sp.detokenize(ids) == SAMPLE  # byte fallback + identity normalisation: exact
    assert sp.tokenize_batch([SAMPLE]) == [ids]
    saved = sp.save(str(tmp_path / "ckpt"))
    assert build_tokenizer("SentencePieceTokenizer", tokenizer_model=saved[0]).tokenize(SAMPLE) == ids


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer) and tok.vocab_size == 100 and tok.eod == 99
    assert tok.tokenize("1 2  30") == [1, 2, 30] and tok.detokenize([1, 2]) == "1 2"


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    with pytest.raises(ValueError, match="unknown --tokenizer-type"):
        build_tokenizer("Bogus")
