"""checkpoint_slices.read_slice in one process: a rank's flat slice of its local shard, in another layout,
read from only the saved pieces overlapping it.

A TP2 checkpoint (offline writer) whose shards are then split into flat pieces spread over several files
(as DP ranks write them) is read into TP1, TP2 and TP4 layouts: the SwiGLU stride-2 fc1 (rows from both
halves), the vocabulary-padded embedding (padding differs per TP size), the row-parallel fc2 (split
along dim 1) and replicated norms. Every slice (whole shards and odd flat ranges) equals the expected cut
of the original full tensor (checkpoint_toys' tensors, cut by shard_of_full); a whole-shard read copies
exactly the shard's bytes (resharded: its real, non-padding, rows), and only from the saved shards that
hold its rows.
"""
import json
import math
import os

import torch

import checkpoint_toys as toys
from megatron_lite.checkpoint_io import METADATA_FILE, CheckpointReader, ParamMeta, file_records
from megatron_lite.checkpoint_offline import write_checkpoint_from_full_tensors
from megatron_lite.checkpoint_slices import Target, files_for_slice, read_slice
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, shard_spec_of
from megatron_lite.tensor_parallel.utils import shard_of_full

LAYERS = 2
CUTS = (3, 7)  # each shard becomes pieces [0, numel/3), [numel/3, numel*3/7)... in different files


def _split_into_pieces(directory: str) -> None:
    """Rewrite every whole shard (model and optim) as three flat pieces, each in a file of its own per
    piece position, and record them in the manifest as a sharded save does."""
    with open(os.path.join(directory, METADATA_FILE)) as handle:
        metadata = json.load(handle)
    reader = CheckpointReader(directory)
    files: dict[str, dict] = {}
    for name, values in metadata["params"].items():
        meta = ParamMeta.from_json(values)
        meta.shard_shapes = [list(reader.shard_tensor(name, i).shape) for i in range(meta.num_shards)]
        for kind in ("model", "optim"):
            per_shard = []
            for index in range(meta.num_shards):
                whole = reader.shard_tensor(name, index, kind) if kind == "model" else {
                    key: reader.shard_tensor(name, index, kind, key) for key in reader.optimizer_keys(name)}
                numel = math.prod(meta.shard_shapes[index])
                bounds = [0, numel // CUTS[0], numel * 3 // CUTS[1], numel]
                pieces = []
                for part, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                    filename = f"{kind}_piece{part}_shard{index}.pt"
                    cut = (lambda t: t.reshape(-1)[lo:hi].clone())
                    files.setdefault(filename, {})[f"{name}[{lo}:{hi}]"] = (
                        cut(whole) if kind == "model" else {k: cut(v) for k, v in whole.items()})
                    pieces.append([filename, lo, hi])
                per_shard.append(pieces)
            meta.pieces[kind] = per_shard
        meta.files = [pieces[0][0] for pieces in meta.pieces["model"]]
        metadata["params"][name] = meta.to_json()
    reader.close()
    for filename in os.listdir(directory):
        if filename.startswith(("model_", "optim_")):
            os.remove(os.path.join(directory, filename))
    for filename, content in files.items():
        torch.save(content, os.path.join(directory, filename))
    metadata["files"] = file_records(directory, [f for f in os.listdir(directory) if f != METADATA_FILE])
    with open(os.path.join(directory, METADATA_FILE), "w") as handle:
        json.dump(metadata, handle)


def test_read_slice_reshards_from_overlapping_pieces_only(tmp_path):
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size = LAYERS, toys.HIDDEN
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = toys.VOCAB, toys.DIVISIBLE_BY
    specs = toys.param_specs(LAYERS)
    originals = {name: toys.full_tensor(name, spec[0]) for name, spec in specs.items() if name != "output_layer.weight"}
    metas = {name: ParamMeta(name=name, shape=list(spec[0]), shard=ShardSpec(spec[2] if spec[1] else None, spec[3],
                                                                             unpadded_size=spec[4]))
             for name, spec in specs.items() if name in originals}
    write_checkpoint_from_full_tensors(str(tmp_path), 1, cfg, originals.items(), metas, tp=2,
                                       optimizer_states=lambda name: {"param": originals[name],
                                                                      "exp_avg": originals[name] * 2})
    directory = str(tmp_path / "iter_0000001")
    _split_into_pieces(directory)
    reader = CheckpointReader(directory)
    assert reader.verify() == []
    for tp in (1, 2, 4):
        for rank in range(tp):
            chunk = toys.ToyChunk(list(range(LAYERS)), True, True, rank, tp, LAYERS, tied=True)
            for name, param in toys.named([chunk]).items():
                expected = shard_of_full(originals[name], param, rank, tp).reshape(-1)
                spec = shard_spec_of(param)
                target = Target(rank if spec.is_sharded else 0, tp if spec.is_sharded else 1, tuple(param.shape))
                numel = param.numel()
                for start, end in ((0, numel), (1, numel - 1), (numel // 3, min(numel, numel // 3 + 5)), (numel - 3, numel)):
                    reader.pieces_read.clear()
                    reader.bytes_read.clear()
                    got = read_slice(reader, name, target, start, end)
                    assert torch.equal(got, expected[start:end]), (tp, rank, name, start, end)
                    assert {f for f, _ in reader.pieces_read} <= files_for_slice(reader, name, target, start, end)
                    optim = read_slice(reader, name, target, start, end, "optim", "exp_avg")
                    assert torch.equal(optim, 2 * expected[start:end]), (tp, rank, name, start, end)
                    if (start, end) != (0, numel):
                        continue
                    # A whole shard: exactly its values were copied, model and optim (resharded: its real rows;
                    # the saved shard itself, padding included, when it is this rank's shard)...
                    real = int(shard_of_full(torch.ones(originals[name].shape), param, rank, tp).sum())
                    own = numel if tp == 2 or not spec.is_sharded else real
                    assert sum(reader.bytes_read.values()) == 2 * 4 * own, (tp, rank, name, reader.bytes_read)
                    # ...and from the saved shards holding its rows only: TP4 rank r's rows are in TP2 shard
                    # r // 2 (the vocabulary padding moves the embedding's boundaries, so it may read both).
                    if tp == 4 and spec.is_sharded and spec.unpadded_size is None:
                        assert {f.rsplit("_shard", 1)[1] for f, _ in reader.pieces_read} == {f"{rank // 2}.pt"}
                    if tp == 4 and name.endswith("linear_fc1.weight"):
                        # A model cutting it differently (stride 1, not SwiGLU's 2) gets its own cut of the
                        # canonical tensor (rebuilt from every shard).
                        plain = ShardSpec(0, 1)
                        got = read_slice(reader, name, Target(rank, tp, tuple(param.shape), plain), start, end)
                        assert torch.equal(got, plain.shard(originals[name], rank, tp).reshape(-1))
