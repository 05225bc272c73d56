"""Tokenizers selected by Megatron's `--tokenizer-type` names.

Every tokenizer exposes `vocab_size`, `eod`, `tokenize(text)`, `tokenize_batch(texts)`,
`detokenize(ids)` and `save(directory)` (copies the files it was built from, so a checkpoint
can carry its tokenizer). Nothing here downloads anything: every file must be local.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# Tried in order to find the end-of-document token of a tokenizer.json / GPT-2 vocabulary.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<|im_end|>")


def _require_file(path: str | None, flag: str, tokenizer_type: str) -> str:
    if path is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{flag} {path}: file not found (tokenizers are never downloaded; give a local path, "
            "e.g. one written by tools/train_tokenizer.py)"
        )
    return path


class MegatronTokenizer:
    """Common interface; subclasses set `files` to the paths that define them."""

    files: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str) -> list[str]:
        """Copy the tokenizer's files into `directory`; returns the new paths."""
        os.makedirs(directory, exist_ok=True)
        saved = []
        for path in self.files:
            target = os.path.join(directory, os.path.basename(path))
            shutil.copyfile(path, target)
            saved.append(target)
        return saved


class SentencePieceTokenizer(MegatronTokenizer):
    """A SentencePiece `.model`; end of document is the model's `</s>` (eos) piece."""

    def __init__(self, model_file: str, num_threads: int = 1) -> None:
        import sentencepiece as spm

        self.files = (model_file,)
        self._sp = spm.SentencePieceProcessor(model_file=model_file, num_threads=num_threads)
        self._eod = self._sp.eos_id()
        if self._eod < 0:
            raise ValueError(
                f"{model_file}: this SentencePiece model has no eos piece, which GPT data needs as "
                "the end-of-document token; retrain it with eos_id >= 0 (tools/train_tokenizer.py does)"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class _HFTokenizersBase(MegatronTokenizer):
    """Shared code for tokenizers backed by the Rust `tokenizers` library."""

    _tok = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def _find_eod(self, source: str, preferred: str | None = None) -> int:
        for token in ((preferred,) if preferred else ()) + _EOD_CANDIDATES:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"{source}: no end-of-document token found (looked for {', '.join(_EOD_CANDIDATES)}); "
            "add one of them to the vocabulary"
        )

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(_HFTokenizersBase):
    """GPT-2 byte-level BPE from `vocab.json` + `merges.txt`; eod is `<|endoftext|>`."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.files = (vocab_file, merge_file)
        bpe = models.BPE.from_file(vocab_file, merge_file)
        self._tok = Tokenizer(bpe)
        # GPT-2's regex split + byte-to-unicode mapping, no prefix space (as in GPT-2).
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._eod = self._find_eod(vocab_file, "<|endoftext|>")


class HuggingFaceTokenizer(_HFTokenizersBase):
    """A local `tokenizer.json` (or a directory holding one); never a hub download."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(json_path):
            raise FileNotFoundError(
                f"--tokenizer-model {path}: no tokenizer.json there. HuggingFaceTokenizer takes a "
                "local tokenizer.json or a directory holding one (no hub downloads)"
            )
        self.files = (json_path,)
        self._tok = Tokenizer.from_file(json_path)
        preferred = None
        config_path = os.path.join(os.path.dirname(json_path), "tokenizer_config.json")
        if os.path.exists(config_path):
            self.files = (json_path, config_path)
            with open(config_path) as f:
                eos = json.load(f).get("eos_token")
            preferred = eos.get("content") if isinstance(eos, dict) else eos
        self._eod = self._find_eod(json_path, preferred)


class NullTokenizer(MegatronTokenizer):
    """No vocabulary file: text is space-separated integer ids (for mock data and tests).

    Unlike Megatron (which adds an extra eod id, making the vocabulary vocab_size + 1), the
    vocabulary here is exactly `vocab_size` and eod is its last id, `vocab_size - 1`, so the
    model's embedding size equals the --vocab-size flag. Kept on purpose: --vocab-size is the model's
    vocabulary everywhere in megatron_lite (mock data, HF imports, checkpoints), and the two conventions
    agree on the one thing data depends on, the eod id being the last id: Megatron's --vocab-size V is
    megatron_lite's --vocab-size V + 1 with the same eod id V. convert.py's Megatron-LM loader and saver
    apply exactly that mapping (megatron_lite/megatron_lm.py).
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size >= 2")
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def save(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "null_tokenizer.json")
        with open(path, "w") as f:
            json.dump({"tokenizer_type": "NullTokenizer", "vocab_size": self._vocab_size}, f)
        return [path]


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
) -> MegatronTokenizer:
    """Build the tokenizer named by Megatron's `--tokenizer-type`."""
    if tokenizer_type == "SentencePieceTokenizer" or tokenizer_type == "GPTSentencePieceTokenizer":
        return SentencePieceTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(
            _require_file(vocab_file, "--vocab-file", tokenizer_type),
            _require_file(merge_file, "--merge-file", tokenizer_type),
        )
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_require_file(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
