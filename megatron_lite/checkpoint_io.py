"""The on-disk checkpoint format, without torch.distributed: paths, atomic writes, metadata, the
offline reader (the offline writer, which tools/checkpoint/* and the HF import use, is checkpoint_offline.py).

Format (FORMAT_VERSION 1), one directory per iteration:

    <save>/latest_checkpointed_iteration.txt      the iteration number, written last
    <save>/iter_0000100/metadata.json             format version, iteration, consumed samples, the
                                                  config dict, the saving layout, per-parameter metadata
    <save>/iter_0000100/model_tp{t}_pp{p}.pt      {global name: local TP shard} written by DP rank 0 of
                                                  each (tp, pp) position; replicated parameters only by TP 0
    <save>/iter_0000100/optim_tp{t}_pp{p}.pt      {global name: {"param", "exp_avg", ...}} TP-local shapes
    (the offline writer -- HF import, reshard -- streams one layer at a time and so splits each
    (tp, pp) file into `_partNNNN` files, one per layer group; metadata.json names each parameter's files)
    <save>/iter_0000100/common.pt                 {"optimizer": state_dict, "opt_param_scheduler": state_dict}
    <save>/iter_0000100/rng_rank{r}.pt            every global rank's RNG states

Each parameter's entry in metadata.json carries what is needed to rebuild its canonical full tensor
from its shards without building a model: shape (full, unpadded), dtype, its ShardSpec
(tensor_model_parallel, partition_dim, partition_stride, unpadded_size, shard_axis), shared_embedding, and `files` (shard files in TP-rank
order; one file for a replicated parameter). We store the metadata rather than rebuild a model on the
meta device when reading, because it keeps the reader independent of model code (a checkpoint stays
readable after the model classes change) and makes offline tools need nothing but the directory.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from megatron_lite.tensor_parallel.shard_spec import ShardSpec, shard_spec_of

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: every shard whole in `files` (and its optim_ twin); still loads
TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "metadata.json"
COMMON_FILE = "common.pt"
TIED_OUTPUT_NAME = "output_layer.weight"
EMBEDDING_NAME = "embedding.word_embeddings.weight"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model. The message says what and how to fix it."""


# ---- names and paths -----------------------------------------------------------------------------
def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def model_file(tp_rank: int, pp_rank: int, part: Optional[int] = None) -> str:
    """A (tp, pp) shard file; the offline writer splits a stage into one `part` per layer to stream."""
    suffix = "" if part is None else f"_part{part:04d}"
    return f"model_tp{tp_rank}_pp{pp_rank}{suffix}.pt"


def optim_file(tp_rank: int, pp_rank: int, part: Optional[int] = None) -> str:
    return optim_name(model_file(tp_rank, pp_rank, part))


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---- parameter metadata --------------------------------------------------------------------------
@dataclass
class ParamMeta:
    """Layout-invariant description of one parameter: its canonical full shape, dtype and ShardSpec (the
    same object the layers attach to their parameters), plus where its shards are stored. metadata.json
    keeps the ShardSpec's flat keys (tensor_model_parallel, partition_dim, partition_stride, unpadded_size)."""
    name: str
    shape: list[int]  # canonical full shape (vocab rows unpadded)
    dtype: str = "float32"
    shard: ShardSpec = field(default_factory=ShardSpec)
    shared_embedding: bool = False
    files: list[str] = field(default_factory=list)  # shard files, TP-rank order
    pp_rank: int = 0
    # Sharded saves (format 2): per shard (axis-rank order) and kind ("model", "optim"), the flat pieces
    # [file, start, end) that make up the shard; `shard_shapes` gives each shard's local shape. Absent:
    # each shard is whole in files[i] (model) and its optim_ twin (optimizer), as in format 1.
    pieces: dict[str, list[list[list]]] = field(default_factory=dict)
    shard_shapes: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict:
        values = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, **self.shard.to_json(),
                  "shared_embedding": self.shared_embedding, "files": list(self.files), "pp_rank": self.pp_rank}
        if self.pieces:
            values.update(pieces=self.pieces, shard_shapes=self.shard_shapes)
        return values

    @classmethod
    def from_json(cls, values: dict) -> "ParamMeta":
        return cls(name=values["name"], shape=list(values["shape"]), dtype=values.get("dtype", "float32"),
                   shard=ShardSpec.from_json(values), shared_embedding=bool(values.get("shared_embedding", False)),
                   files=list(values.get("files", [])), pp_rank=int(values.get("pp_rank", 0)),
                   pieces={k: [[list(p) for p in shard] for shard in v] for k, v in values.get("pieces", {}).items()},
                   shard_shapes=[list(s) for s in values.get("shard_shapes", [])])

    @property
    def num_shards(self) -> int:
        return len(self.pieces["model"]) if "model" in self.pieces else len(self.files)

    def pieces_of(self, kind: str, index: int) -> list[tuple[str, int, Optional[int]]]:
        """(file, flat start, flat end or None for 'the whole shard') of shard `index` of `kind`."""
        if kind in self.pieces:
            return sorted((str(f), int(s), int(e)) for f, s, e in self.pieces[kind][index])
        filename = self.files[index]
        return [(filename if kind == "model" else optim_name(filename), 0, None)]

    def shard_files(self, kind: str) -> list[str]:
        """Every file holding a piece of this parameter's `kind` state."""
        return sorted({f for i in range(self.num_shards) for f, _, _ in self.pieces_of(kind, i)})

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def is_tied_copy(self) -> bool:
        return is_tied_copy(self.name, self.shared_embedding)

    def local_shape(self, tp_size: int, make_vocab_size_divisible_by: int = 128) -> list[int]:
        """The shard shape in a layout with `tp_size` (vocab rows padded as Megatron pads them)."""
        padded = None
        if self.shard.unpadded_size is not None:
            padded = _pad_vocab_size(self.shard.unpadded_size, make_vocab_size_divisible_by, tp_size)
        try:
            return list(self.shard.local_shape(self.shape, tp_size, padded))
        except ValueError as error:
            raise CheckpointError(f"{self.name}: {error} (TP={tp_size}).") from None


def _pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def is_tied_copy(name: str, shared_embedding: bool) -> bool:
    """The last stage's copy of the tied word embedding: never saved, refilled from the embedding on load."""
    return name == TIED_OUTPUT_NAME and shared_embedding


def piece_key(name: str, start: int, end: Optional[int], numel: Optional[int]) -> str:
    """The key of a piece inside its file: the bare name for a whole shard (stored in its local shape, as
    in format 1), `name[start:end]` for a flat slice (e.g. a distributed-optimizer DP slice)."""
    return name if start == 0 and (end is None or end == numel) else f"{name}[{start}:{end}]"


def param_meta_of(name: str, param: torch.Tensor, tp_size: int, pp_rank: int = 0) -> ParamMeta:
    """Metadata of a (local shard) parameter; its canonical full shape follows from the shard shape."""
    spec = shard_spec_of(param)
    return ParamMeta(name=name, shape=list(spec.full_shape(param.shape, tp_size)),
                     dtype=str(param.dtype).replace("torch.", ""), shard=spec,
                     shared_embedding=bool(getattr(param, "shared_embedding", False)), pp_rank=pp_rank)


def param_meta_from_model(model_chunks: Iterable[torch.nn.Module], tp_size: int = 1) -> dict[str, ParamMeta]:
    """Metadata of every parameter of (possibly meta-device) model chunks: what the offline writer needs
    for an import (e.g. build GPTModel on torch.device('meta') with TP=PP=1, then call this)."""
    metas: dict[str, ParamMeta] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            metas[strip_wrapper_prefix(name)] = param_meta_of(strip_wrapper_prefix(name), param, tp_size)
    return metas


def strip_wrapper_prefix(name: str) -> str:
    """DDP-style wrappers add 'module.'; checkpoint names are the bare model's global names."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


# ---- atomic file operations ----------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    """Make a rename/creation in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary name, fsync, then os.replace: a reader sees the whole file or none."""
    tmp = path + ".partial"
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def file_record(path: str) -> dict:
    """{"size": bytes, "crc32": hex}: what the manifest (metadata.json "files") records per file. CRC-32 over
    the whole file in 8 MiB blocks (zlib: ~1 GB/s), so a truncated or bit-flipped file is caught on load."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(8 << 20)
            if not block:
                break
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"size": size, "crc32": f"{crc:08x}"}


def file_records(directory: str, filenames: Iterable[str]) -> dict[str, dict]:
    return {name: file_record(os.path.join(directory, name)) for name in sorted(set(filenames))}


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_tracker(load_dir: str) -> Optional[int]:
    """The iteration in `<load_dir>/latest_checkpointed_iteration.txt`, or None when there is none."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":  # Megatron's converted checkpoints
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}. Fix or delete the file.") from None


def write_tracker(save_dir: str, iteration: int) -> None:
    atomic_write_text(os.path.join(save_dir, TRACKER_FILE), f"{iteration}\n")


def prepare_tmp_dir(save_dir: str, iteration: int) -> str:
    """Create an empty `<save>/iter_N.tmp` (a stale one from a crashed save is removed first)."""
    tmp = os.path.join(save_dir, iteration_dir_name(iteration) + ".tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    fsync_dir(save_dir)
    return tmp


def remove_stale_tmp_dirs(save_dir: str) -> list[str]:
    """Remove every `iter_N.tmp` under `save_dir`: what a save killed midway left behind (never loaded:
    only a published `iter_N` counts). Call only while no save of this job is in flight."""
    removed = []
    if not os.path.isdir(save_dir):
        return removed
    for entry in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, entry)
        if entry.startswith("iter_") and entry.endswith(".tmp") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def publish(save_dir: str, iteration: int) -> str:
    """Rename the finished `iter_N.tmp` to `iter_N`, then point the tracker at it.

    An older directory of the same iteration is moved aside first and removed only after the new one is
    in place, so at every instant either it or the new one exists (`resolve_iteration_dir` falls back to
    `iter_N.old` if a crash happened between the two renames). The tracker is written last.
    """
    final = os.path.join(save_dir, iteration_dir_name(iteration))
    tmp, old = final + ".tmp", final + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(save_dir)
    write_tracker(save_dir, iteration)
    if os.path.exists(old):
        shutil.rmtree(old)
    return final


def resolve_iteration_dir(path: str) -> str:
    """`path` may be an iteration directory or a save directory with a tracker file."""
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"{path}: no {TRACKER_FILE} and no {METADATA_FILE}; not a megatron_lite checkpoint. "
                              "Point at a --save directory or one of its iter_NNNNNNN directories.")
    final = os.path.join(path, iteration_dir_name(iteration))
    for candidate in (final, final + ".old"):
        if os.path.isfile(os.path.join(candidate, METADATA_FILE)):
            return candidate
    raise CheckpointError(f"{path}: {TRACKER_FILE} names iteration {iteration} but {final}/{METADATA_FILE} is "
                          "missing (deleted or from another format). Fix the tracker to name an existing iteration.")


# ---- reading -------------------------------------------------------------------------------------
class CheckpointReader:
    """Read-only access to one checkpoint, usable without torch.distributed.

    Shard files are opened with mmap (weights_only), so `full_tensor(name)` reads only that parameter's
    bytes; peak memory is one full tensor at a time. Open files are cached until `close()`. A load in
    another layout reads one rank's slice through checkpoint_slices.py, from the overlapping pieces only;
    `pieces_read` ({(file, piece key)}) and `bytes_read` ({file: bytes}) record what was read.
    """

    def __init__(self, path: str):
        self.path = resolve_iteration_dir(path)
        with open(os.path.join(self.path, METADATA_FILE)) as handle:
            self.metadata: dict = json.load(handle)
        version = self.metadata.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{self.path}: format version {version}, this code reads {READABLE_VERSIONS}. "
                                  "Convert it with a matching megatron_lite version.")
        self.params: dict[str, ParamMeta] = {name: ParamMeta.from_json(values)
                                              for name, values in self.metadata["params"].items()}
        self._files: dict[str, dict] = {}
        self._verified: set[str] = set()
        self.pieces_read: set[tuple[str, str]] = set()
        self.bytes_read: dict[str, int] = {}

    @property
    def has_checksums(self) -> bool:
        """False for checkpoints written before the manifest recorded file sizes and CRC-32s."""
        return "files" in self.metadata

    def file_problem(self, filename: str) -> Optional[str]:
        """Why `filename` does not match the manifest (missing, size, CRC-32), or None if it does or the
        manifest predates checksums. The size is checked first, so truncation is found without reading."""
        path = os.path.join(self.path, filename)
        where = f"{path} (iteration {self.iteration})"
        if not os.path.isfile(path):
            return (f"{path} is missing (iteration {self.iteration}): the checkpoint is incomplete. "
                    "Load an earlier iteration (--ckpt-step N).")
        expected = self.metadata.get("files", {}).get(filename)
        if expected is None or filename in self._verified:
            return None
        fix = "Restore the file, or load an earlier iteration (--ckpt-step N)."
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{where} is {size} bytes, the manifest says {expected['size']}: truncated or damaged. {fix}"
        actual = file_record(path)["crc32"]
        if actual != expected["crc32"]:
            return f"{where}: CRC-32 {actual}, the manifest says {expected['crc32']}: the file is damaged. {fix}"
        self._verified.add(filename)
        return None

    def verify(self, filenames: Optional[Iterable[str]] = None) -> list[str]:
        """Problems of the given files (default: every file the manifest lists), one line each."""
        names = self.metadata.get("files", {}) if filenames is None else filenames
        return [problem for problem in map(self.file_problem, sorted(set(names))) if problem]

    def _checked_path(self, filename: str) -> str:
        problem = self.file_problem(filename)
        if problem:
            raise CheckpointError(problem)
        return os.path.join(self.path, filename)

    @property
    def iteration(self) -> int:
        return int(self.metadata["iteration"])

    @property
    def consumed_samples(self) -> int:
        return int(self.metadata.get("consumed_samples", 0))

    @property
    def layout(self) -> dict:
        return dict(self.metadata["layout"])

    @property
    def config(self) -> dict:
        return dict(self.metadata.get("config") or {})

    def param_names(self) -> list[str]:
        return list(self.params)

    def param_meta(self) -> dict[str, ParamMeta]:
        return dict(self.params)

    def has_optimizer(self) -> bool:
        return bool(self.metadata.get("has_optimizer"))

    def _open(self, filename: str) -> dict:
        if filename not in self._files:
            path = self._checked_path(filename)
            self._files[filename] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._files[filename]

    def _full(self, meta: ParamMeta, shards: list[torch.Tensor]) -> torch.Tensor:
        full = meta.shard.unshard(shards)
        if list(full.shape) != list(meta.shape):
            raise CheckpointError(f"{self.path}: parameter {meta.name} rebuilds to shape {list(full.shape)}, "
                                  f"metadata says {meta.shape}; the checkpoint is corrupt.")
        return full

    def full_tensor(self, name: str, kind: str = "model", key: Optional[str] = None) -> torch.Tensor:
        """The canonical (unpadded, layout-free) full tensor of parameter `name` (kind "optim": of its
        optimizer state `key`)."""
        meta = self._meta(name) if kind == "model" else self._optim_meta(name)
        return self._full(meta, [self.shard_tensor(name, i, kind, key) for i in range(meta.num_shards)])

    def optimizer_full_state(self, name: str) -> dict[str, torch.Tensor]:
        """{"param": fp32 main, "exp_avg": ..., ...} of parameter `name`, each a canonical full tensor."""
        return {key: self.full_tensor(name, "optim", key) for key in self.optimizer_keys(name)}

    def optimizer_keys(self, name: str) -> list[str]:
        meta = self._optim_meta(name)
        filename, start, end = meta.pieces_of("optim", 0)[0]
        return list(self._open(filename)[piece_key(name, start, end, self._shard_numel(meta, 0))])

    def shard_tensor(self, name: str, index: int, kind: str = "model", key: Optional[str] = None) -> torch.Tensor:
        """Shard `index` (axis-rank order) of parameter `name` as saved: the model weight, or (kind 'optim')
        optimizer state `key`, in the saving layout's local shape."""
        meta = self._meta(name)
        numel = self._shard_numel(meta, index)
        pieces = meta.pieces_of(kind, index)
        return self._join(meta, index, kind, pieces, key, 0, numel)

    def shard_slice(self, name: str, index: int, start: int, end: int, kind: str = "model",
                    key: Optional[str] = None) -> torch.Tensor:
        """Flat [start, end) of shard `index`: reads only the pieces that overlap it (files are mmapped)."""
        meta = self._meta(name)
        pieces = [p for p in meta.pieces_of(kind, index) if p[0] and p[1] < end and (p[2] is None or p[2] > start)]
        return self._join(meta, index, kind, pieces, key, start, end).reshape(-1)

    def _shard_numel(self, meta: ParamMeta, index: int) -> int:
        """Elements of saved shard `index`: from its recorded shape, or (a converter's or format-1 checkpoint
        records none) the shape the saving layout implies, so a piece covering the whole shard is always
        keyed by its bare name."""
        return math.prod(self.shard_shape(meta.name, index))

    def shard_shape(self, name: str, index: int) -> list[int]:
        """The local shape of saved shard `index` of `name` (format 1: from the saving layout's vocabulary padding)."""
        meta = self._meta(name)
        if meta.shard_shapes:
            return list(meta.shard_shapes[index])
        divisible = self.config.get("model", {}).get("make_vocab_size_divisible_by", 128)
        return meta.local_shape(meta.num_shards, divisible) if meta.shard.is_sharded else list(meta.shape)

    def overlapping_pieces(self, name: str, index: int, kind: str, start: int, end: int) -> list[tuple[str, int, int]]:
        """(file, piece start, piece end) of the saved pieces of shard `index` that overlap flat [start, end)."""
        meta = self._meta(name)
        numel = self._shard_numel(meta, index)
        pieces = [(f, s, numel if e is None else e) for f, s, e in meta.pieces_of(kind, index)]
        return [(f, s, e) for f, s, e in pieces if s < end and e > start]

    def piece(self, name: str, index: int, filename: str, start: int, end: int, key: Optional[str] = None) -> torch.Tensor:
        """The flat tensor of one saved piece (mmapped: nothing is read until its values are used)."""
        entry_key = piece_key(name, start, end, self._shard_numel(self._meta(name), index))
        entry = self._open(filename)[entry_key]
        self.pieces_read.add((filename, entry_key))
        return (entry[key] if key is not None else entry).reshape(-1)

    def note_read(self, filename: str, tensor: torch.Tensor) -> None:
        self.bytes_read[filename] = self.bytes_read.get(filename, 0) + tensor.numel() * tensor.element_size()

    def _join(self, meta: ParamMeta, index: int, kind: str, pieces: list, key: Optional[str], start: int,
              end: Optional[int]) -> torch.Tensor:
        """Concatenate the pieces covering flat [start, end) of one shard (whole shard: in its local shape)."""
        numel = self._shard_numel(meta, index)
        parts, position = [], start
        for filename, piece_start, piece_end in pieces:
            entry_key = piece_key(meta.name, piece_start, piece_end, numel)
            entry = self._open(filename)[entry_key]
            self.pieces_read.add((filename, entry_key))
            tensor = entry[key] if key is not None else entry
            if piece_start == 0 and piece_end is None and start == 0 and (end is None or end == tensor.numel()):
                self.note_read(filename, tensor)
                return tensor  # a whole shard (format 1, or a save that wrote it in one piece)
            piece_end = piece_start + tensor.numel() if piece_end is None else piece_end
            if piece_start > position:
                break
            lo, hi = position - piece_start, min(end, piece_end) - piece_start
            parts.append(tensor.reshape(-1)[lo:hi])
            self.note_read(filename, parts[-1])
            position = piece_start + hi
        if position != end or not parts:
            raise CheckpointError(f"{self.path}: {kind} shard {index} of {meta.name}: the saved pieces do not cover "
                                  f"[{start}, {end}) (they stop at {position}); the manifest is inconsistent.")
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return flat.view(meta.shard_shapes[index]) if start == 0 and end == numel else flat

    def _optim_meta(self, name: str) -> ParamMeta:
        if not self.has_optimizer():
            raise CheckpointError(f"{self.path} holds no optimizer state (saved with --no-save-optim).")
        return self._meta(name)

    def common(self) -> dict:
        """{"optimizer": ..., "opt_param_scheduler": ...} state dicts (absent keys were not saved)."""
        if not os.path.isfile(os.path.join(self.path, COMMON_FILE)):
            return {}
        return torch.load(self._checked_path(COMMON_FILE), map_location="cpu", weights_only=True)

    def load_file(self, filename: str) -> Any:
        """torch.load of one (verified) file of the checkpoint, e.g. a rank's RNG states."""
        return torch.load(self._checked_path(filename), map_location="cpu", weights_only=True)

    def _meta(self, name: str) -> ParamMeta:
        if name not in self.params:
            raise CheckpointError(f"{self.path} has no parameter {name!r}.")
        return self.params[name]

    def close(self) -> None:
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def optim_name(model_filename: str) -> str:
    return "optim_" + model_filename[len("model_"):]


def shard_name_layout(filename: str) -> tuple[int, int]:
    match = re.fullmatch(r"(?:model|optim)_tp(\d+)_pp(\d+)(?:_part\d+)?\.pt", filename)
    if match is None:
        raise CheckpointError(f"unexpected shard file name {filename}")
    return int(match.group(1)), int(match.group(2))


def build_metadata(iteration: int, consumed_samples: int, config_dict: dict, layout: dict,
                   params: dict[str, ParamMeta], has_optimizer: bool, files: Optional[dict] = None,
                   extra: Optional[dict] = None) -> dict:
    """The manifest. `files`: {filename: file_record} of every other file of the checkpoint (checked on load;
    checkpoints written before it existed have none and load unverified). `extra`: more top-level keys."""
    metadata = {"format_version": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
                "layout": layout, "has_optimizer": has_optimizer, "config": config_dict,
                "params": {name: meta.to_json() for name, meta in sorted(params.items())}}
    if files is not None:
        metadata["files"] = dict(sorted(files.items()))
    metadata.update(extra or {})
    return metadata
