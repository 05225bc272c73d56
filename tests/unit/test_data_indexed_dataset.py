"""Megatron .bin/.idx round trips, byte-exact layout and clear errors on bad files."""

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    optimal_dtype,
)


def _build(prefix, docs, dtype):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return IndexedDataset(str(prefix))


def test_idx_bytes_match_hand_computed_megatron_layout(tmp_path):
    prefix = tmp_path / "small"
    _build(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + (1).to_bytes(8, "little")  # version
        + bytes([8])  # dtype code 8 = uint16
        + (2).to_bytes(8, "little")  # sequences
        + (3).to_bytes(8, "little")  # document boundaries = documents + 1
        + b"\x03\x00\x00\x00" + b"\x02\x00\x00\x00"  # int32 lengths
        + (0).to_bytes(8, "little") + (6).to_bytes(8, "little")  # int64 byte offsets
        + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    )
    assert (tmp_path / "small.idx").read_bytes() == expected_idx
    assert (tmp_path / "small.bin").read_bytes() == bytes([1, 0, 2, 0, 3, 0, 4, 0, 5, 0])


def test_multi_sequence_document_and_add_item(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    builder.add_item([7, 8])
    builder.add_item([9])
    builder.end_document()
    builder.add_document([1, 2, 3, 4], [1, 3])
    builder.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert len(ds) == 4
    assert ds.document_indices.tolist() == [0, 2, 4]
    assert ds.sequence_lengths.tolist() == [2, 1, 1, 3]
    assert [ds[i].tolist() for i in range(4)] == [[7, 8], [9], [1], [2, 3, 4]]


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = DTYPE_CODES[code]
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (5, 0, 17, 1, 64)]
    ds = _build(tmp_path / "d", docs, dtype)
    assert (tmp_path / "d.idx").read_bytes()[17] == code
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs)
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    np.testing.assert_array_equal(ds.get(2, 3, 5), docs[2][3:8])
    np.testing.assert_array_equal(ds.get(4, 60), docs[4][60:])
    assert ds.num_tokens == sum(len(d) for d in docs)


def test_add_documents_batch_equals_one_by_one(tmp_path):
    docs = [[1, 2], [3], [4, 5, 6]]
    _build(tmp_path / "a", docs, np.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype=np.uint16)
    builder.add_documents(np.array([1, 2, 3], np.uint16), np.array([2, 1]))
    builder.add_documents(np.array([4, 5, 6], np.uint16), np.array([3]))
    builder.finalize(str(tmp_path / "b.idx"))
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_add_index_merges(tmp_path):
    _build(tmp_path / "x", [[1, 2], [3]], np.uint16)
    _build(tmp_path / "y", [[4, 5, 6]], np.uint16)
    _build(tmp_path / "xy_expected", [[1, 2], [3], [4, 5, 6]], np.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "xy.bin"), dtype=np.uint16)
    builder.add_index(str(tmp_path / "x"))
    builder.add_index(str(tmp_path / "y"))
    builder.finalize(str(tmp_path / "xy.idx"))
    assert (tmp_path / "xy.idx").read_bytes() == (tmp_path / "xy_expected.idx").read_bytes()
    assert (tmp_path / "xy.bin").read_bytes() == (tmp_path / "xy_expected.bin").read_bytes()
    _build(tmp_path / "z", [[1]], np.int32)
    with pytest.raises(ValueError, match="dtype"):
        builder = IndexedDatasetBuilder(str(tmp_path / "bad.bin"), dtype=np.uint16)
        builder.add_index(str(tmp_path / "z"))


def test_optimal_dtype():
    assert optimal_dtype(32000) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    _build(tmp_path / "ok", [[1, 2, 3], [4, 5]], np.uint16)
    idx = (tmp_path / "ok.idx").read_bytes()
    binary = (tmp_path / "ok.bin").read_bytes()

    def write(name, idx_bytes, bin_bytes=binary):
        (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        return str(tmp_path / name)

    cases = {
        "short_idx": (idx[:-3], binary, "truncated"),
        "tiny_idx": (idx[:10], binary, "truncated"),
        "magic": (b"XXXXXXXXX" + idx[9:], binary, "magic"),
        "version": (idx[:9] + (2).to_bytes(8, "little") + idx[17:], binary, "version"),
        "dtype": (idx[:17] + bytes([9]) + idx[18:], binary, "dtype code 9"),
        "short_bin": (idx, binary[:-2], "truncated"),
        "doc_end": (idx[:-8] + (5).to_bytes(8, "little"), binary, "document indices"),
    }
    for name, (idx_bytes, bin_bytes, message) in cases.items():
        prefix = write(name, idx_bytes, bin_bytes)
        with pytest.raises(IndexedDatasetError, match=message) as info:
            IndexedDataset(prefix)
        assert name in str(info.value)
    with pytest.raises(IndexedDatasetError, match="not found"):
        IndexedDataset(str(tmp_path / "missing"))
