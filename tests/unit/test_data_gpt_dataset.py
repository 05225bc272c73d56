"""GPT samples, splits, caching, mock data, blending and the resumable sampler."""

import numpy as np
import pytest
import torch

from megatron_lite.data.blended_dataset import BlendedDataset, build_blending_indices
from megatron_lite.data.builder import build_gpt_datasets, parse_data_path
from megatron_lite.data.gpt_dataset import (
    GPTDataset,
    build_sample_index,
    get_ltor_masks_and_position_ids,
    get_split_indices,
)
from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_lite.data.samplers import MegatronPretrainingSampler, build_pretraining_data_loader

EOD = 0
VOCAB = 1000


def make_corpus(prefix, num_docs=40, seed=0, first_token=1):
    """Documents of random lengths (some of length 1) whose tokens end with EOD."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    docs = []
    for _ in range(num_docs):
        doc = rng.integers(first_token, VOCAB, size=int(rng.integers(0, 30))).tolist() + [EOD]
        docs.append(doc)
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return IndexedDataset(str(prefix)), docs


def test_samples_are_consecutive_tokens_of_shuffled_documents(tmp_path):
    ds, docs = make_corpus(tmp_path / "c")
    documents = np.arange(5, 35)
    seq = 16
    gpt = GPTDataset(ds, documents, seq_length=seq, num_samples=100, seed=7, eod_id=EOD)
    assert len(gpt) >= 100 and gpt.num_epochs > 1
    # Every epoch of the document index is a permutation of the split's documents.
    per_epoch = np.asarray(gpt.document_index).reshape(gpt.num_epochs, len(documents))
    for epoch in per_epoch:
        assert sorted(epoch.tolist()) == documents.tolist()
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    stream = np.concatenate([docs[d] for d in gpt.document_index])
    assert sorted(np.asarray(gpt.shuffle_index).tolist()) == list(range(len(gpt)))
    for i in range(len(gpt)):
        sample = int(gpt.shuffle_index[i])
        expected = stream[sample * seq : sample * seq + seq + 1]
        item = gpt[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), expected[:-1])
        np.testing.assert_array_equal(item["labels"].numpy(), expected[1:])
        assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
        assert "attention_mask" not in item


def test_sample_index_with_empty_documents():
    sizes = np.array([3, 0, 0, 5, 1])
    index = build_sample_index(sizes, np.arange(5), seq_length=3, num_samples=2)
    # Samples start at tokens 0, 3, 6 of the stream: doc 0 offset 0, doc 3 offset 0, doc 3 offset 3.
    assert index.tolist() == [[0, 0], [3, 0], [3, 3]]


def test_masks_match_megatron_loop():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 4, size=24)  # eod = 0 appears often
    loss_mask, position_ids, attention_mask = get_ltor_masks_and_position_ids(tokens, 0, True, True, True)
    ref_mask = np.tril(np.ones((24, 24)))
    ref_pos = np.arange(24)
    prev = 0
    for i in np.nonzero(tokens == 0)[0]:
        ref_mask[i + 1 :, : i + 1] = 0
        ref_pos[i + 1 :] -= i + 1 - prev
        prev = i + 1
    np.testing.assert_array_equal(attention_mask[0], ref_mask < 0.5)
    np.testing.assert_array_equal(position_ids, ref_pos)
    np.testing.assert_array_equal(loss_mask, (tokens != 0).astype(np.float32))
    plain_loss, plain_pos, plain_mask = get_ltor_masks_and_position_ids(tokens, 0, False, False, False)
    assert plain_mask is None and plain_loss.min() == 1 and plain_pos.tolist() == list(range(24))


def test_splits_are_disjoint_and_cover():
    for n in (1000, 37, 3):
        bounds = get_split_indices("949,50,1", n)
        assert bounds[0] == 0 and bounds[-1] == n and bounds == sorted(bounds)
    assert get_split_indices("949,50,1", 1000) == [0, 949, 999, 1000]
    assert get_split_indices("1", 10) == [0, 10, 10, 10]
    with pytest.raises(ValueError, match="--split"):
        get_split_indices("a,b", 10)


def test_build_gpt_datasets_splits_and_cache(tmp_path):
    ds, docs = make_corpus(tmp_path / "c", num_docs=200)
    kwargs = dict(split="80,15,5", seq_length=8, num_samples=(50, 20, 10), seed=1, mock=False, vocab_size=VOCAB, eod_id=EOD)
    train, valid, test = build_gpt_datasets([str(tmp_path / "c")], cache_path=str(tmp_path / "cache"), **kwargs)
    sets = [set(np.asarray(d.document_index).tolist()) for d in (train, valid, test)]
    assert sets[0] == set(range(160)) and sets[1] == set(range(160, 190)) and sets[2] == set(range(190, 200))
    cached = list((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 9
    again = build_gpt_datasets([str(tmp_path / "c")], cache_path=str(tmp_path / "cache"), **kwargs)[0]
    assert again.build_seconds == 0.0  # loaded, not rebuilt
    uncached = build_gpt_datasets([str(tmp_path / "c")], cache_path=None, **kwargs)[0]
    for i in range(len(train)):
        assert torch.equal(again[i]["tokens"], uncached[i]["tokens"])
    none_valid = build_gpt_datasets([str(tmp_path / "c")], cache_path=None, **{**kwargs, "split": "100,0,0"})
    assert none_valid[1] is None and none_valid[2] is None


def test_mock_data_is_deterministic_and_has_the_interface():
    kwargs = dict(split="949,50,1", seq_length=32, num_samples=(64, 8, 8), cache_path=None, mock=True, vocab_size=500, eod_id=499)
    a = build_gpt_datasets(None, seed=5, **kwargs)
    b = build_gpt_datasets(None, seed=5, **kwargs)
    c = build_gpt_datasets(None, seed=6, **kwargs)
    for i in range(64):
        assert torch.equal(a[0][i]["tokens"], b[0][i]["tokens"])
        assert int(a[0][i]["tokens"].max()) < 500
    assert not torch.equal(a[0][0]["tokens"], c[0][0]["tokens"])
    assert a[1] is not None and a[2] is not None
    assert (a[0][0]["tokens"] == 499).any() or (a[0][1]["tokens"] == 499).any()


def test_parse_data_path():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="weight prefix"):
        parse_data_path(["0.3", "a", "b"])


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 1], [0.5, 0.25, 0.15, 0.1], [0.01, 0.99]])
def test_blending_proportions_within_one_sample_at_every_prefix(weights):
    size = 5000
    dataset_index, sample_index = build_blending_indices(weights, size)
    w = np.asarray(weights) / np.sum(weights)
    onehot = np.eye(len(w), dtype=np.int64)[dataset_index]
    counts = np.cumsum(onehot, axis=0)  # counts[n-1, d]: samples of d among the first n
    target = np.arange(1, size + 1)[:, None] * w[None, :]
    assert np.abs(counts - target).max() <= 1.0
    # Each dataset's samples are taken in order 0, 1, 2, ...
    for d in range(len(w)):
        assert sample_index[dataset_index == d].tolist() == list(range(int(counts[-1, d])))


def test_blended_gpt_datasets(tmp_path):
    make_corpus(tmp_path / "a", num_docs=50, seed=1, first_token=1)
    make_corpus(tmp_path / "b", num_docs=50, seed=2, first_token=1)
    data_path = ["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")]
    train, valid, test = build_gpt_datasets(
        data_path, "90,10,0", 8, (100, 10, 0), 3, str(tmp_path / "cache"), False, VOCAB, EOD
    )
    assert isinstance(train, BlendedDataset) and len(train) == 100 and len(valid) == 10 and test is None
    assert abs(int((np.asarray(train.dataset_index) == 0).sum()) - 30) <= 1
    for i in (0, 17, 99):
        component = train.datasets[int(train.dataset_index[i])]
        assert torch.equal(train[i]["tokens"], component[int(train.dataset_sample_index[i])]["tokens"])


def _global_stream(dataset, consumed, mbs, dp, steps):
    """Per step, the concatenation of every DP rank's micro-batch tokens."""
    loaders = [iter(build_pretraining_data_loader(dataset, consumed, mbs, r, dp)) for r in range(dp)]
    return [torch.cat([next(it)["tokens"] for it in loaders]) for _ in range(steps)]


def test_sampler_is_layout_invariant_and_resumes_exactly():
    train = build_gpt_datasets(None, "1", 16, (200, 0, 0), 11, None, True, 300, 299)[0]
    reference = _global_stream(train, 0, 8, 1, 10)  # global batch 8, one rank
    for mbs, dp in ((4, 2), (2, 4), (1, 8)):
        assert all(torch.equal(a, b) for a, b in zip(reference, _global_stream(train, 0, mbs, dp, 10)))
    for consumed in (8, 24, 56):
        resumed = _global_stream(train, consumed, 4, 2, 3)
        assert all(torch.equal(a, b) for a, b in zip(reference[consumed // 8 :], resumed))
    # Raw sampler: rank slices of each step, and len() counts whole steps.
    sampler = MegatronPretrainingSampler(20, 3, 2, 1, 3)
    assert list(sampler) == [[5, 6], [11, 12]] and len(sampler) == 2
    batch = next(iter(build_pretraining_data_loader(train, 0, 4, 0, 2)))
    assert batch["tokens"].shape == (4, 16) and batch["loss_mask"].shape == (4, 16)
