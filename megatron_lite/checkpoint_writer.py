"""Sharded checkpoint writes: the plan (which rank writes which piece), this rank's host snapshot, and
the writer job (run inline, or on a background thread with --async-save).

Every rank reports what it holds of each parameter: its shard index along the ShardSpec's axis, the
shard's local shape, and the flat ranges [start, end) of that shard it holds as model weights and as
optimizer state (the distributed optimizer's DP slices; the whole shard otherwise). `plan_writes` is a
pure function of every rank's report, so each rank computes the same plan without another message:
each range is cut at every holder's boundaries, each resulting piece is written by exactly one of the
ranks that hold it (ranges held by one rank first, then replicas to the least-loaded holder), and the
manifest records every piece as [file, start, end]. Nothing is communicated but the small reports: no
rank ever receives another rank's optimizer slice. The plan knows nothing about DP, TP or experts, only
shard indices and flat ranges, so a ZeRO-3 weight slice or an expert shard on an "ep" axis is one more
report entry, not a format change (ZeRO-3 reports each weight's flat slices in its DP shard, so no rank
gathers a full weight to save it).
"""
from __future__ import annotations

import copy
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from megatron_lite import fault_injection
from megatron_lite.checkpoint_io import CheckpointError, ParamMeta, file_records, fsync_dir, piece_key

KINDS = ("model", "optim")


class CheckpointSaveError(CheckpointError, OSError):
    """A save failed on some rank (disk full, unwritable directory, ...). Raised on every rank together;
    the tracker still names the previous checkpoint. An OSError too, so callers catching I/O errors see it."""


# ---- the plan -------------------------------------------------------------------------------------
def file_stem(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """A writer rank's files: model_tp{t}_pp{p}.pt for DP rank 0 (format 1's names), then _dp{d}."""
    return f"tp{tp_rank}_pp{pp_rank}" + (f"_dp{dp_rank}" if dp_rank else "")


def plan_writes(reports: list[dict]) -> tuple[dict[int, dict[str, list]], dict[str, ParamMeta]]:
    """(per writer rank {kind: [(name, shard index, start, end)]}, per parameter its ParamMeta with
    `files`, `pieces` and `shard_shapes` filled in). `reports[r]` is rank r's `holdings` report."""
    metas, holders, shapes = {}, {}, {}
    for report in reports:
        for name, held in report["params"].items():
            meta = ParamMeta.from_json(held["meta"])
            if name in metas and metas[name].shape != meta.shape:
                raise CheckpointError(f"{name}: ranks disagree on its full shape ({metas[name].shape} vs {meta.shape}).")
            metas.setdefault(name, meta)
            shapes[(name, held["index"])] = held["shape"]
            for kind in KINDS:
                for start, end in held[kind]:
                    holders.setdefault((name, kind, held["index"]), []).append((report["rank"], start, end, held["bytes"][kind]))
    units = []
    for (name, kind, index), held in holders.items():
        cuts = sorted({x for _, start, end, _ in held for x in (start, end)})
        for lo, hi in zip(cuts, cuts[1:]):
            owners = sorted({rank for rank, start, end, _ in held if start <= lo and hi <= end})
            if owners:
                units.append((len(owners) > 1, -(hi - lo) * held[0][3], name, kind, index, lo, hi, owners))
    counts = {}
    for name, index in shapes:
        counts[name] = max(counts.get(name, 0), index + 1)
    units.sort()  # pieces only one rank holds first (no choice), then the largest replicated ones
    load: dict[int, int] = {}
    assign: dict[int, dict[str, list]] = {r["rank"]: {kind: [] for kind in KINDS} for r in reports}
    stems = {r["rank"]: r["stem"] for r in reports}
    for _, weight, name, kind, index, lo, hi, owners in units:
        writer = min(owners, key=lambda rank: (load.get(rank, 0), rank))
        load[writer] = load.get(writer, 0) - weight
        assign[writer][kind].append((name, index, lo, hi))
        meta = metas[name]
        meta.pieces.setdefault(kind, [[] for _ in range(counts[name])])[index].append([f"{kind}_{stems[writer]}.pt", lo, hi])
    for name, meta in metas.items():
        meta.shard_shapes = [list(shapes[(name, i)]) for i in range(counts[name])]
        _check_coverage(meta)
        meta.files = [sorted(pieces)[0][0] for pieces in meta.pieces["model"]]
    return assign, metas


def _check_coverage(meta: ParamMeta) -> None:
    """Every shard of every saved kind is covered exactly by its pieces (else the layout is unsupported)."""
    for kind, per_shard in meta.pieces.items():
        for index, pieces in enumerate(per_shard):
            pieces.sort(key=lambda piece: piece[1])
            numel = 1
            for size in meta.shard_shapes[index]:
                numel *= size
            position = 0
            for _, start, end in pieces:
                position = end if start == position else -1
            if position != numel:
                raise CheckpointError(f"{meta.name}: the ranks' {kind} ranges of shard {index} do not cover it "
                                      f"(numel {numel}); cannot save this layout.")


# ---- this rank's snapshot -------------------------------------------------------------------------
def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # copy=True: a parameter may be a view of a contiguous buffer (saving the view would write the buffer).
    return tensor.detach().to("cpu", copy=True)


def host_tensor(tensor: torch.Tensor, snapshot: bool) -> torch.Tensor:
    """What a file stores: a copy when `snapshot` (the values change while a background writer runs) or
    when the tensor is a view into a larger storage or off the host; else the tensor itself (no memory)."""
    whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return host_copy(tensor) if snapshot or not whole or tensor.device.type != "cpu" else tensor.detach()


def snapshot_pieces(assigned: dict[str, list], model_ranges: dict[str, list], optim_ranges: dict[str, list],
                    shapes: dict[str, list[int]], snapshot: bool = True) -> dict[str, dict]:
    """{kind: {piece key: host tensor (model) or {state key: host tensor} (optim)}} of what this rank writes.
    `model_ranges[name]`: [(start, end, flat tensor)] of the weight this rank holds (the whole shard, or
    ZeRO-3's slices); `optim_ranges[name]`: [(start, end, {key: flat tensor})]. `snapshot`: copy every
    tensor (--async-save); a synchronous save copies only views and device tensors (host_tensor)."""
    out: dict[str, dict] = {kind: {} for kind in KINDS}
    for kind, ranges in (("model", model_ranges), ("optim", optim_ranges)):
        for name, _, lo, hi in assigned[kind]:
            numel = math.prod(shapes[name])
            start, _, held = next(r for r in ranges[name] if r[0] <= lo and hi <= r[1])
            whole = piece_key(name, lo, hi, numel) == name

            def cut(value: torch.Tensor) -> torch.Tensor:
                return host_tensor(value.view(shapes[name]) if whole else value.reshape(-1)[lo - start:hi - start], snapshot)
            out[kind][piece_key(name, lo, hi, numel)] = (cut(held) if kind == "model" else
                                                         {key: cut(value) for key, value in held.items()})
    return out


# ---- the writer -----------------------------------------------------------------------------------
@dataclass
class SaveJob:
    """One rank's part of one save: files to write into `tmp`, then their manifest records.

    `save_fn(obj, path)` writes one file atomically (temp name, fsync, rename). `run()` is what the
    background thread executes with --async-save (inline otherwise); it never communicates, so the
    training loop's collectives are never interleaved with it. `records`/`error` are read after `done`."""
    iteration: int
    rank: int
    tmp: str
    files: dict[str, Any]
    save_fn: Callable[[Any, str], None]
    records: dict = field(default_factory=dict)
    error: Optional[str] = None
    thread: Optional[threading.Thread] = None

    def run(self) -> None:
        try:
            for filename, obj in self.files.items():
                path = os.path.join(self.tmp, filename)
                fault_injection.maybe_fail_write(self.iteration, self.rank, path)
                self.save_fn(obj, path)
            fsync_dir(self.tmp)
            self.records = file_records(self.tmp, self.files)
        except Exception as error:  # noqa: BLE001 - any failure must reach finalize, or a partial save would publish
            self.error = f"rank {self.rank}: {type(error).__name__}: {error}"
        finally:
            self.files = {}  # free the host snapshot as soon as it is on disk

    def start(self) -> None:
        # Not a daemon: an interpreter exiting mid-write still finishes the files (the tracker is not touched).
        self.thread = threading.Thread(target=self.run, name=f"checkpoint-writer-{self.iteration}")
        self.thread.start()

    @property
    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


def deep_host_copy(obj: Any) -> Any:
    """A copy of a state dict whose tensors are on the host (the optimizer's and scheduler's small states)."""
    return copy.deepcopy(obj) if not isinstance(obj, torch.Tensor) else host_copy(obj)
