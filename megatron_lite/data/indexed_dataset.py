"""Megatron-LM's `.bin/.idx` token file format, read (mmap) and written byte for byte.

Layout of `{prefix}.idx` (little-endian, no padding):

    b"MMIDIDX\\x00\\x00"          9-byte magic
    uint64  version (= 1)
    uint8   dtype code (see DTYPE_CODES)
    uint64  N, the number of sequences
    uint64  D, the number of document boundaries (documents + 1)
    int32[N]  sequence lengths (in tokens)
    int64[N]  byte offset of each sequence in `.bin`
    int64[D]  document indices: sequence index where each document starts, 0 ... N

`{prefix}.bin` is the tokens of all sequences back to back. In GPT pretraining data every
document is one sequence, so N == D - 1.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Sequence

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype, N, D

# Megatron's DType enum values; the code is what is stored in the header.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}

# Write buffered tokens to the .bin file once this many bytes are pending (large sequential
# writes are what keeps preprocessing I/O-cheap).
_WRITE_CHUNK_BYTES = 16 * 1024 * 1024


def data_file_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def optimal_dtype(vocab_size: int | None) -> type:
    """Megatron's choice: uint16 when every token id fits comfortably, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype) -> int:
    try:
        return _CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(
            f"dtype {np.dtype(dtype)} cannot be stored in a Megatron .idx file; "
            f"use one of {[np.dtype(d).name for d in DTYPE_CODES.values()]}"
        ) from None


def exists(path_prefix: str) -> bool:
    return os.path.exists(index_file_path(path_prefix)) and os.path.exists(
        data_file_path(path_prefix)
    )


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated or corrupt; the message names the file."""


class _Index:
    """Parsed `.idx` file; arrays are zero-copy views of a read-only memory map."""

    def __init__(self, idx_path: str) -> None:
        self.path = idx_path
        if not os.path.exists(idx_path):
            raise IndexedDatasetError(
                f"{idx_path}: index file not found (expected a Megatron .idx next to the .bin; "
                "create it with tools/preprocess_data.py)"
            )
        file_size = os.path.getsize(idx_path)
        if file_size < _HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path}: truncated index file ({file_size} bytes, the header alone is "
                f"{_HEADER_SIZE}); regenerate it with tools/preprocess_data.py"
            )
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        magic = header[: len(INDEX_MAGIC)]
        if magic != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: not a Megatron mmap index (magic {magic!r}, expected "
                f"{INDEX_MAGIC!r})"
            )
        pos = len(INDEX_MAGIC)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(
                f"{idx_path}: unsupported index version {version} (only {INDEX_VERSION} is known)"
            )
        (code,) = struct.unpack_from("<B", header, pos + 8)
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{idx_path}: unknown dtype code {code} (valid codes: {sorted(DTYPE_CODES)})"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sequence_count, self.document_count = struct.unpack_from("<QQ", header, pos + 9)
        n, d = self.sequence_count, self.document_count
        expected = _HEADER_SIZE + 4 * n + 8 * n + 8 * d
        if file_size != expected:
            what = "truncated" if file_size < expected else "has trailing bytes"
            raise IndexedDatasetError(
                f"{idx_path}: index {what}: header declares {n} sequences and {d} document "
                f"boundaries, so the file should be {expected} bytes, but it is {file_size}"
            )
        self._mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = self._mmap
        offset = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n, offset=offset)
        offset += 4 * n
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=offset)
        offset += 8 * n
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=d, offset=offset)
        self._validate()

    def _validate(self) -> None:
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != self.sequence_count:
            raise IndexedDatasetError(
                f"{self.path}: corrupt document indices: they must start at 0 and end at the "
                f"sequence count {self.sequence_count}"
                + (f" (got {docs[0]} ... {docs[-1]})" if len(docs) else " (none stored)")
            )
        if len(docs) > 1 and np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(f"{self.path}: corrupt document indices: not sorted")
        if self.sequence_count and np.any(self.sequence_lengths < 0):
            raise IndexedDatasetError(f"{self.path}: corrupt index: negative sequence length")

    def check_layout(self, bin_path: str) -> None:
        """The pointers must tile the .bin back to back (Megatron's writer, and every tool here, write them
        so): a same-size .bin/.idx pair from different runs is caught here, in one vectorised pass."""
        if self.sequence_count == 0:
            return
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        bad = pointers[0] != 0 or np.any(pointers[1:] != pointers[:-1] + lengths[:-1].astype(np.int64) * self.dtype.itemsize)
        if bad:
            raise IndexedDatasetError(
                f"{self.path}: does not match {bin_path}: its sequence pointers do not follow its sequence "
                "lengths (a corrupt or foreign .idx); regenerate both with tools/preprocess_data.py"
            )

    @property
    def data_bytes(self) -> int:
        """Bytes of .bin that the index refers to."""
        if self.sequence_count == 0:
            return 0
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize


class IndexedDataset:
    """Memory-mapped Megatron dataset: `ds[i]` is sequence i as a NumPy array (no copy)."""

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        self.index = _Index(index_file_path(path_prefix))
        bin_path = data_file_path(path_prefix)
        if not os.path.exists(bin_path):
            raise IndexedDatasetError(
                f"{bin_path}: data file not found (the .idx exists; was preprocessing interrupted?)"
            )
        bin_size = os.path.getsize(bin_path)
        need = self.index.data_bytes
        if bin_size < need:
            raise IndexedDatasetError(
                f"{bin_path}: data file truncated: the index refers to {need} bytes but the file "
                f"has {bin_size}; regenerate it with tools/preprocess_data.py"
            )
        if bin_size > need:
            raise IndexedDatasetError(
                f"{bin_path}: does not match its index {self.index.path}: the index covers {need} bytes "
                f"but the data file has {bin_size} (an .idx from another .bin, or an interrupted rewrite); "
                "regenerate both with tools/preprocess_data.py"
            )
        self.index.check_layout(bin_path)
        # np.memmap refuses empty files; an empty dataset simply has no buffer.
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        self.dtype = self.index.dtype

    def __len__(self) -> int:
        return self.index.sequence_count

    def __getitem__(self, idx: int) -> np.ndarray:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences")
        idx = idx % len(self) if idx < 0 else idx
        return np.frombuffer(
            self._bin,
            dtype=self.dtype,
            count=int(self.index.sequence_lengths[idx]),
            offset=int(self.index.sequence_pointers[idx]),
        )

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx (to its end when length is None)."""
        seq_len = int(self.index.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of "
                f"length {seq_len}"
            )
        pointer = int(self.index.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=pointer)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.index.sequence_lengths

    @property
    def document_indices(self) -> np.ndarray:
        return self.index.document_indices

    @property
    def num_tokens(self) -> int:
        return int(self.index.sequence_lengths.sum(dtype=np.int64))


class IndexedDatasetBuilder:
    """Writes `.bin` while collecting lengths, then `finalize(idx_path)` writes the `.idx`.

    Mirrors Megatron's builder (`add_item`, `end_document`, `add_document`, `add_index`,
    `finalize`) plus `add_documents` for whole batches of documents at once.
    """

    def __init__(self, bin_path: str, dtype=np.int32) -> None:
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.bin_path = bin_path
        self._file = open(bin_path, "wb")
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # Lengths and document boundaries kept as lists of arrays, concatenated at finalize.
        self._lengths: list[np.ndarray] = []
        self._doc_starts: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._num_sequences = 0
        self._pending_item_lengths: list[int] = []

    def _write(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype).tobytes()
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= _WRITE_CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._pending = []
            self._pending_bytes = 0

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Add one sequence; call `end_document()` after the document's last sequence."""
        array = np.asarray(tokens)
        self._write(array)
        self._pending_item_lengths.append(array.size)

    def end_document(self) -> None:
        self._lengths.append(np.asarray(self._pending_item_lengths, dtype=np.int64))
        self._num_sequences += len(self._pending_item_lengths)
        self._pending_item_lengths = []
        self._doc_starts.append(np.array([self._num_sequences], np.int64))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Iterable[int]) -> None:
        """Add one document made of sequences of the given lengths (tokens concatenated)."""
        self._flush_items_check()
        lengths = np.asarray(list(lengths), dtype=np.int64)
        array = np.asarray(tokens)
        if lengths.sum() != array.size:
            raise ValueError(f"lengths sum to {lengths.sum()} but {array.size} tokens were given")
        self._write(array)
        self._lengths.append(lengths)
        self._num_sequences += len(lengths)
        self._doc_starts.append(np.array([self._num_sequences], np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Add many single-sequence documents: `tokens` is their concatenation."""
        self._flush_items_check()
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != np.asarray(tokens).size:
            raise ValueError(f"lengths sum to {lengths.sum()} but {np.asarray(tokens).size} tokens were given")
        self._write(tokens)
        self._lengths.append(lengths)
        self._doc_starts.append(self._num_sequences + np.arange(1, len(lengths) + 1, dtype=np.int64))
        self._num_sequences += len(lengths)

    def _flush_items_check(self) -> None:
        if self._pending_item_lengths:
            raise RuntimeError("add_item() was called without end_document(); end the document first")

    def add_index(self, path_prefix: str) -> None:
        """Append a whole existing dataset (used by merge_datasets.py and partitions)."""
        self._flush_items_check()
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"{path_prefix}: dtype {other.dtype} differs from the builder's {self.dtype}; "
                "datasets can only be merged when they were tokenized with the same vocabulary size"
            )
        self._flush()
        nbytes = other.index.data_bytes
        if nbytes:
            # Copy in chunks so merging large files needs little memory.
            with open(data_file_path(path_prefix), "rb") as src:
                remaining = nbytes
                while remaining:
                    chunk = src.read(min(remaining, 64 * 1024 * 1024))
                    self._file.write(chunk)
                    remaining -= len(chunk)
        self._lengths.append(np.asarray(other.sequence_lengths, dtype=np.int64))
        self._doc_starts.append(self._num_sequences + np.asarray(other.document_indices[1:], np.int64))
        self._num_sequences += len(other)

    def finalize(self, idx_path: str) -> None:
        """Flush `.bin` and write the `.idx` file."""
        self._flush_items_check()
        self._flush()
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence longer than 2**31-1 tokens cannot be stored in an .idx file")
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.concatenate(self._doc_starts).astype(np.int64)
        write_index(idx_path, self.dtype, lengths, pointers, doc_indices)

    def close(self) -> None:
        """Abandon the build (closes the .bin without writing an index)."""
        if not self._file.closed:
            self._file.close()


def builder_for_prefix(path_prefix: str, dtype) -> IndexedDatasetBuilder:
    """A builder that writes `<prefix>.bin` under a temporary name; publish it with `finalize_prefix`,
    so readers never see a half-written dataset."""
    return IndexedDatasetBuilder(data_file_path(path_prefix) + ".tmp", dtype=dtype)


def finalize_prefix(builder: IndexedDatasetBuilder, path_prefix: str) -> None:
    """Write the index, then rename `.bin` and `.idx` into place (the `.idx` last: it marks completion)."""
    builder.finalize(index_file_path(path_prefix) + ".tmp")
    os.replace(data_file_path(path_prefix) + ".tmp", data_file_path(path_prefix))
    os.replace(index_file_path(path_prefix) + ".tmp", index_file_path(path_prefix))


def merge_indexed_datasets(path_prefixes: Sequence[str], output_prefix: str, dtype=None) -> None:
    """Concatenate datasets (documents in order) into `output_prefix`; dtype defaults to the first's."""
    dtype = dtype if dtype is not None else IndexedDataset(path_prefixes[0]).dtype
    builder = builder_for_prefix(output_prefix, dtype)
    for prefix in path_prefixes:
        builder.add_index(prefix)
    finalize_prefix(builder, output_prefix)


def write_index(idx_path: str, dtype, lengths: np.ndarray, pointers: np.ndarray, doc_indices: np.ndarray) -> None:
    with open(idx_path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(np.asarray(lengths, dtype="<i4").tobytes(order="C"))
        f.write(np.asarray(pointers, dtype="<i8").tobytes(order="C"))
        f.write(np.asarray(doc_indices, dtype="<i8").tobytes(order="C"))
