"""Save and load training checkpoints, resharding on load to any TP / PP / VP / DP layout.

`save_checkpoint` writes `<save>/iter_NNNNNNN/` (format: see checkpoint_io.py) and then
`<save>/latest_checkpointed_iteration.txt`, as Megatron does. `load_checkpoint` restores model,
optimizer (distributed shards included), LR scheduler, loss scaler, RNG states and consumed samples,
honouring --no-load-optim, --no-load-rng and --finetune.

Departure from the target design ("torch.distributed.checkpoint underneath", docs/internals.md): a stride-2 SwiGLU fc1 shard
(a slice of the gate half and of the up half) and a padded vocab shard are not even DTensor shards, so
DCP cannot describe them. Instead each parameter is stored as its TP shards (each as the flat pieces its
holders wrote: whole, DP slices of the distributed optimizer, ZeRO-3's slices of the weights) plus its
ShardSpec; loading reads, for the flat ranges of its own shard a rank holds, only the saved pieces that
overlap them, mapping rows through both layouts' ShardSpec cuts (checkpoint_slices.py). Resharding is
therefore one code path for every layout, and no rank builds a full tensor to save or load.

Crash safety: every rank writes into `<save>/iter_N.tmp`; each file goes to a temporary name, is
fsynced and renamed. Only when every rank has finished (barrier) does rank 0 rename the directory to
`iter_N` and then rewrite the tracker file, so a crash at any point leaves the previous checkpoint and
the tracker pointing at it intact. All communication goes through megatron_lite.collectives.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch

from megatron_lite import collectives, parallel_state
from megatron_lite.checkpoint_io import (COMMON_FILE, EMBEDDING_NAME, METADATA_FILE, CheckpointError,
                                         CheckpointReader, atomic_torch_save, atomic_write_text,
                                         build_metadata, is_tied_copy, iteration_dir_name, param_meta_of,
                                         prepare_tmp_dir, publish, read_tracker, remove_stale_tmp_dirs, rng_file,
                                         strip_wrapper_prefix)
from megatron_lite.checkpoint_slices import Target, files_for_slice, read_slice
from megatron_lite.checkpoint_writer import (KINDS, CheckpointSaveError, SaveJob, deep_host_copy, file_stem,
                                             plan_writes, snapshot_pieces)
from megatron_lite.distributed.model_chunk import as_model_chunks
from megatron_lite.process_groups import GROUP_FIELDS, ProcessGroups
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of

__all__ = ["save_checkpoint", "load_checkpoint", "finalize_pending_save", "pending_save_iteration", "read_tracker",
           "CheckpointError", "CheckpointSaveError", "CheckpointReader"]


# ---- layout of this process ----------------------------------------------------------------------
def _groups(groups: Optional[ProcessGroups]) -> ProcessGroups:
    """The groups passed in; a script that built parallel_state's groups may leave them out."""
    if groups is not None:
        return groups
    return parallel_state.get_process_groups() if parallel_state.model_parallel_is_initialized() else ProcessGroups.single()


def _layout(config: Any, groups: ProcessGroups) -> dict:
    """Where this rank sits, and the saving layout recorded in metadata.json."""
    return {
        "tp": groups.tp.size, "tp_rank": groups.tp.rank, "pp": groups.pp.size, "pp_rank": groups.pp.rank,
        "vp": groups.vp_size, "dp": groups.dp.size,
        # The DP x CP position names a rank's files (model_tp{t}_pp{p}_dp{d}.pt); which pieces it writes is
        # planned from what every rank holds (checkpoint_writer.plan_writes).
        "dp_rank": groups.dp_cp.rank, "world_size": groups.world.size, "rank": groups.world.rank,
        "axes": {name: (getattr(groups, name).rank, getattr(groups, name).size) for name in GROUP_FIELDS},
        "distributed_optimizer": bool(config.parallel.use_distributed_optimizer),
        "sharding_strategy": config.parallel.sharding_strategy,  # informational: every strategy saves one format
        "ep": groups.ep.size, "etp": groups.etp.size,  # MoE: generate.py's default expert layout
    }


def _local_slices(model: Any) -> dict[str, tuple[torch.nn.Parameter, list]]:
    """Every local parameter over all model chunks, by global name (chunks use global layer numbers), with
    the flat ranges of it this rank holds at rest: [(start, end, flat tensor)] (ModelChunk.local_slices:
    the whole parameter, or ZeRO-3's pieces of it, never gathered)."""
    held: dict[str, tuple[torch.nn.Parameter, list]] = {}
    for chunk in as_model_chunks(model):
        for name, (param, pieces) in chunk.local_slices().items():  # waits for any overlapped param all-gather
            name = strip_wrapper_prefix(name)
            if name in held and held[name][0] is not param:
                raise CheckpointError(f"parameter name {name} appears in two model chunks; names must be global.")
            held[name] = (param, pieces)
    return held


def _named_params(model: Any) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, (param, _) in _local_slices(model).items()}


# ---- RNG -----------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """This rank's RNG states (tensor_parallel.random's), with numpy's key array as a tensor so the
    file loads with weights_only=True."""
    from megatron_lite.tensor_parallel import random as tp_random
    state = dict(tp_random.get_all_rng_states())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict) -> None:
    from megatron_lite.tensor_parallel import random as tp_random
    state = dict(state)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    state["python"] = _to_tuple(state["python"])
    tp_random.set_all_rng_states(state)


def _to_tuple(value: Any) -> Any:
    # random.setstate needs tuples all the way down; serialisers may hand back lists.
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---- save ----------------------------------------------------------------------------------------
# The save in flight (--async-save): at most one per process; every rank has one at the same iterations.
_PENDING: Optional["_PendingSave"] = None


def _atomic_save(obj: Any, path: str) -> None:
    atomic_torch_save(obj, path)  # looked up at call time (tests replace it to inject failures)


def save_checkpoint(iteration: int, model: Any, optimizer: Any, opt_param_scheduler: Any,
                    consumed_samples: int, config: Any, save_dir: Optional[str] = None,
                    groups: Optional[ProcessGroups] = None, data_fingerprint: Optional[dict] = None,
                    async_save: bool = False) -> str:
    """Save on every rank (collective); returns the `<save>/iter_NNNNNNN` directory (published on return,
    or with `async_save` once `finalize_pending_save` has run). Each rank writes only the pieces the plan
    gives it (checkpoint_writer.py); rank 0 writes the manifest last. A save still in flight is finished
    first. `data_fingerprint` (data.builder.data_fingerprint) goes into metadata.json for load to compare.
    A failed write on any rank raises CheckpointSaveError on every rank; the tracker is left unchanged."""
    save_dir = save_dir or config.checkpoint.save
    if not save_dir:
        raise CheckpointError("save_checkpoint: no directory. Pass --save DIR.")
    groups = _groups(groups)
    finalize_pending_save(groups)
    layout = _layout(config, groups)
    save_optim = optimizer is not None and not config.checkpoint.no_save_optim
    tmp = _prepare(save_dir, iteration, groups)

    held = _local_slices(model)
    params = {name: param for name, (param, _) in held.items()}
    model_ranges = {name: pieces for name, (_, pieces) in held.items()}
    optim_ranges = _optimizer_ranges(optimizer, params) if save_optim else {}
    report = _holdings(params, model_ranges, optim_ranges, layout)
    assign, metas = plan_writes(collectives.all_gather_object(report, groups.world))
    pieces = snapshot_pieces(assign[layout["rank"]], model_ranges, optim_ranges, report["shapes"], snapshot=async_save)
    files = {f"{kind}_{report['stem']}.pt": pieces[kind] for kind in KINDS if pieces[kind]}
    files[rng_file(layout["rank"])] = get_rng_state()
    if layout["rank"] == 0:
        common = {}
        if save_optim:
            common["optimizer"] = deep_host_copy(optimizer.state_dict())
        if opt_param_scheduler is not None:
            common["opt_param_scheduler"] = deep_host_copy(opt_param_scheduler.state_dict())
        files[COMMON_FILE] = common
    job = SaveJob(iteration, layout["rank"], tmp, files, _atomic_save)
    saved_layout = {k: layout[k] for k in ("tp", "pp", "vp", "dp", "world_size", "distributed_optimizer",
                                           "sharding_strategy", "ep", "etp")}
    metadata = build_metadata(iteration, consumed_samples, config.to_dict(), saved_layout, metas, save_optim,
                              files={}, extra={} if data_fingerprint is None else {"data_fingerprint": data_fingerprint})
    global _PENDING
    _PENDING = _PendingSave(job, save_dir, metadata, groups)
    if async_save:
        job.start()  # the loop continues; finalize_pending_save publishes it once every rank is durable
    else:
        job.run()
        finalize_pending_save(groups)
    return os.path.join(save_dir, iteration_dir_name(iteration))


@dataclass
class _PendingSave:
    job: SaveJob
    save_dir: str
    metadata: dict  # the manifest without its file records (those come from every rank's writer)
    groups: ProcessGroups


def pending_save_iteration() -> Optional[int]:
    """The iteration of the save in flight (--async-save), or None."""
    return None if _PENDING is None else _PENDING.job.iteration


def finalize_pending_save(groups: Optional[ProcessGroups] = None, blocking: bool = True) -> Optional[int]:
    """Publish the save in flight once every rank's files are durable (collective when one is in flight;
    every rank has the same one). Non-blocking: publish only if every rank's writer is done already (one
    small all-reduce). Returns the published iteration, or None. The tracker moves only here: after every
    rank's files are fsynced and renamed, rank 0 writes the manifest, renames iter_N.tmp and the tracker."""
    global _PENDING
    pending = _PENDING
    if pending is None:
        return None
    groups = groups or pending.groups
    if blocking:
        pending.job.wait()
    elif collectives.any_rank(not pending.job.done, groups.world):
        return None
    _PENDING = None
    job = pending.job
    outcomes = collectives.all_gather_object((job.records, job.error), groups.world)
    errors = [error for _, error in outcomes if error]
    if not errors and groups.world.rank == 0:
        try:
            _publish(pending, [records for records, _ in outcomes])
        except OSError as error:
            errors = [f"rank 0: {type(error).__name__}: {error}"]
    errors = collectives.broadcast_object(errors, src=groups.world.global_rank(0), group=groups.world)
    if errors:
        raise CheckpointSaveError(_save_failed_message(pending, job.iteration, errors))
    return job.iteration


def _publish(pending: "_PendingSave", records: list[dict]) -> None:
    """Rank 0: the manifest (every rank's files' sizes and CRC-32s) last, then iter_N and the tracker."""
    tmp = pending.job.tmp
    metadata = dict(pending.metadata)
    metadata["files"] = dict(sorted(kv for rank_records in records for kv in rank_records.items()))
    atomic_write_text(os.path.join(tmp, METADATA_FILE), json.dumps(metadata, indent=1))
    publish(pending.save_dir, pending.job.iteration)


def _save_failed_message(pending: "_PendingSave", iteration: int, errors: list[str]) -> str:
    latest = read_tracker(pending.save_dir) if os.path.isdir(pending.save_dir) else None
    kept = (f"the latest checkpoint is still iteration {latest} (its files and the tracker were not touched)"
            if latest is not None else "no earlier checkpoint exists")
    return (f"saving iteration {iteration} to {pending.save_dir} failed: " + "; ".join(errors) + f". {kept}; "
            f"the partial {iteration_dir_name(iteration)}.tmp is removed by the next save. Fix: free space on "
            "the --save file system or make it writable, then resume with --load.")


def _prepare(save_dir: str, iteration: int, groups: ProcessGroups) -> str:
    """Rank 0 creates an empty iter_N.tmp (removing stale ones); every rank learns whether it could."""
    tmp = os.path.join(save_dir, iteration_dir_name(iteration) + ".tmp")
    error = None
    if groups.world.rank == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            _remove_stale_tmp_dirs(save_dir)
            tmp = prepare_tmp_dir(save_dir, iteration)
        except OSError as failure:
            error = f"rank 0: cannot create {tmp}: {type(failure).__name__}: {failure}"
    error = collectives.broadcast_object(error, src=groups.world.global_rank(0), group=groups.world)
    if error:
        pending = _PendingSave(SaveJob(iteration, groups.world.rank, tmp, {}, _atomic_save), save_dir, {}, groups)
        raise CheckpointSaveError(_save_failed_message(pending, iteration, [error]))
    return tmp


def _axis_of(param: torch.Tensor, layout: dict) -> tuple[int, int]:
    """(rank, size) of this process in the group `param`'s ShardSpec splits it over ((0, 1): replicated)."""
    spec = shard_spec_of(param)
    if not spec.is_sharded:
        return 0, 1
    axes = layout.get("axes") or {"tp": (layout["tp_rank"], layout["tp"])}
    if spec.axis not in axes:
        raise CheckpointError(f"a parameter is sharded over axis {spec.axis!r}, which this job has no group for.")
    return axes[spec.axis]


def _optimizer_ranges(optimizer: Any, params: dict[str, torch.nn.Parameter]) -> dict[str, list]:
    """{name: [(start, end, {state key: flat tensor})]}: the optimizer state this rank holds, without any
    communication. An optimizer without `local_parameter_state` (not sharded) holds whole parameters."""
    ranges: dict[str, list] = {}
    if hasattr(optimizer, "local_parameter_state"):
        for name, start, end, states in optimizer.local_parameter_state():
            ranges.setdefault(name, []).append((start, end, states))
    else:
        for name, states in optimizer.get_parameter_state().items():
            ranges[name] = [(0, params[name].numel(), states)]
    return {name: r for name, r in ranges.items() if not _is_tied(name, params)}


def _is_tied(name: str, params: dict[str, torch.nn.Parameter]) -> bool:
    return name in params and is_tied_copy(name, bool(getattr(params[name], "shared_embedding", False)))


def _holdings(params: dict[str, torch.nn.Parameter], model_ranges: dict[str, list], optim_ranges: dict[str, list],
              layout: dict) -> dict:
    """What this rank holds of each parameter (the plan's input): shard index, local shape, flat ranges
    (model weights: the whole shard, or under ZeRO-3 the flat slices of it in this rank's DP shard)."""
    held, shapes = {}, {}
    for name, param in params.items():
        if _is_tied(name, params):
            continue  # refilled from the embedding on load
        index, size = _axis_of(param, layout)
        meta = param_meta_of(name, param, size, layout["pp_rank"])
        states = optim_ranges.get(name, [])
        held[name] = {"meta": meta.to_json(), "index": index, "shape": list(param.shape),
                      "model": [(start, end) for start, end, _ in model_ranges[name]],
                      "optim": [(start, end) for start, end, _ in states],
                      "bytes": {"model": param.element_size(), "optim": 4 * len(states[0][2]) if states else 0}}
        shapes[name] = list(param.shape)
    stem = file_stem(layout["tp_rank"], layout["pp_rank"], layout["dp_rank"])
    return {"rank": layout["rank"], "stem": stem, "params": held, "shapes": shapes}


def _remove_stale_tmp_dirs(save_dir: str) -> None:
    for path in remove_stale_tmp_dirs(save_dir):
        print(f"removed {path}: an unfinished save (the job died while writing it)", flush=True)


# ---- load ----------------------------------------------------------------------------------------
def load_checkpoint(model: Any, optimizer: Any, opt_param_scheduler: Any, config: Any,
                    load_dir: Optional[str] = None, groups: Optional[ProcessGroups] = None,
                    data_fingerprint: Optional[dict] = None) -> tuple[int, int]:
    """Load on every rank (collective); returns (iteration, consumed_samples), (0, 0) when `load_dir`
    holds no checkpoint yet (a fresh run, as in Megatron) or with --finetune. A `data_fingerprint` that
    differs from the saved one is an error (unless --finetune or --allow-data-change)."""
    ckpt = config.checkpoint
    load_dir = load_dir or ckpt.load
    if not load_dir:
        return 0, 0
    if getattr(ckpt, "ckpt_step", None) is not None:
        load_dir = os.path.join(load_dir, iteration_dir_name(ckpt.ckpt_step))
        if not os.path.isfile(os.path.join(load_dir, METADATA_FILE)):
            raise CheckpointError(f"--ckpt-step {ckpt.ckpt_step}: {load_dir} holds no checkpoint. "
                                  "Pick an iteration that exists under --load.")
    groups = _groups(groups)
    if groups.world.rank == 0 and ckpt.save and os.path.abspath(ckpt.save) == os.path.abspath(load_dir):
        _remove_stale_tmp_dirs(load_dir)  # before any rank of this job saves
    if read_tracker(load_dir) is None and not os.path.isfile(os.path.join(load_dir, METADATA_FILE)):
        if groups.world.rank == 0:
            warnings.warn(f"no checkpoint in {load_dir} (no latest_checkpointed_iteration.txt): starting from scratch.")
        return 0, 0
    layout = _layout(config, groups)
    held = _local_slices(model)
    params = {name: param for name, (param, _) in held.items()}
    model_ranges = {name: [(start, end) for start, end, _ in pieces] for name, (_, pieces) in held.items()}

    # Validate on every rank, then agree, so that every rank raises the same error instead of some
    # waiting forever in a collective.
    reader, problems = None, []
    load_optim = optimizer is not None and not ckpt.finetune and not ckpt.no_load_optim
    try:
        reader = CheckpointReader(load_dir)
        optim_ranges = _optimizer_ranges_of(optimizer, params) if load_optim else None
        problems = _local_problems(reader, params, layout, optim_ranges, _other_files_read(reader, ckpt, layout, load_optim),
                                   model_ranges)
        problems += _data_problems(reader, ckpt, data_fingerprint)
    except Exception as error:  # noqa: BLE001 - reported by every rank together below, never a lone raise
        problems = [f"{type(error).__name__}: {error}"]
    results = collectives.all_gather_object((problems, sorted(params)), groups.world)
    all_problems = sorted({p for rank_problems, _ in results for p in rank_problems})
    if reader is not None and not all_problems:
        model_names = {n for _, names in results for n in names}
        unexpected = [n for n in reader.param_names() if n not in model_names]
        all_problems = [f"{n}: in the checkpoint but not in the model" for n in unexpected]
    if all_problems:
        raise CheckpointError(_mismatch_message(load_dir, reader, config, all_problems))
    if groups.world.rank == 0 and not reader.has_checksums:
        warnings.warn(f"{reader.path} was written before checkpoints recorded file checksums: its files are "
                      "loaded without verification (re-save it to add them).")

    _load_model(reader, params, layout, held)
    finetune = ckpt.finetune
    if load_optim:
        common = reader.common()
        if "optimizer" in common:
            optimizer.load_state_dict(common["optimizer"])
        _load_optimizer_state(reader, optimizer, params, layout)
        if opt_param_scheduler is not None and "opt_param_scheduler" in common:
            opt_param_scheduler.load_state_dict(common["opt_param_scheduler"])
    elif optimizer is not None:
        _refresh_main_params(optimizer, params)
    if not finetune and not ckpt.no_load_rng:
        _load_rng(reader, layout)
    iteration, consumed = (0, 0) if finetune else (reader.iteration, reader.consumed_samples)
    if groups.world.rank == 0:
        print(f"loaded checkpoint from {load_dir} at iteration {reader.iteration}"
              + (" (--finetune: starting at iteration 0)" if finetune else ""), flush=True)
    reader.close()
    collectives.barrier(groups.world)
    return iteration, consumed


def _expected_full_shapes(params: dict[str, torch.nn.Parameter], layout: dict) -> dict[str, list[int]]:
    return {name: param_meta_of(name, p, _axis_of(p, layout)[1]).shape for name, p in params.items()}


def _source_name(name: str, param: torch.Tensor) -> str:
    """The checkpoint entry a local parameter is loaded from (the tied copy reads the embedding)."""
    return EMBEDDING_NAME if is_tied_copy(name, bool(getattr(param, "shared_embedding", False))) else name


def _target(param: torch.Tensor, layout: dict) -> Target:
    index, size = _axis_of(param, layout)
    return Target(index, size, tuple(param.shape), shard_spec_of(param))


def _files_read(reader: CheckpointReader, name: str, param: torch.Tensor, layout: dict,
                optim_ranges: Optional[list], model_ranges: Optional[list] = None) -> set[str]:
    """The files this rank reads for `param`: the saved pieces overlapping the flat ranges of its local
    shard that it loads (its model ranges, default the whole shard; its optimizer ranges), in its layout
    (checkpoint_slices.py: the same plan the load follows)."""
    source, target = _source_name(name, param), _target(param, layout)
    files: set[str] = set()
    for kind, ranges in (("model", model_ranges or [(0, param.numel())]), ("optim", optim_ranges or [])):
        for start, end in ranges:
            files |= files_for_slice(reader, source, target, start, end, kind)
    return files


def _local_problems(reader: CheckpointReader, params: dict[str, torch.nn.Parameter], layout: dict,
                    optim_ranges: Optional[dict], also: Iterable[str] = (),
                    model_ranges: Optional[dict] = None) -> list[str]:
    """Everything that would make this rank fail mid-load, found before any data is read.
    `optim_ranges`: {name: [(start, end)]} of the optimizer state to load, or None (not loading it);
    `model_ranges`: {name: [(start, end)]} of the weights this rank holds (default: whole shards)."""
    if optim_ranges is not None and not reader.has_optimizer():
        return [f"{reader.path} has no optimizer state (saved with --no-save-optim). "
                "Load with --no-load-optim (fresh optimizer) or --finetune."]
    problems, needed_files = [], set()
    for name, shape in _expected_full_shapes(params, layout).items():
        source = _source_name(name, params[name])
        if source not in reader.params:
            problems.append(f"{name}: in the model but not in the checkpoint")
        elif reader.params[source].shape != shape:
            problems.append(f"{name}: checkpoint shape {reader.params[source].shape} vs model shape {shape}")
        else:
            ranges = None if optim_ranges is None else optim_ranges.get(name, [(0, params[name].numel())])
            needed_files |= _files_read(reader, name, params[name], layout, ranges, (model_ranges or {}).get(name))
    # Every file this rank will read must match the manifest's size and CRC-32 (missing files too).
    return problems + reader.verify(needed_files | set(also))


def _data_problems(reader: CheckpointReader, ckpt: Any, current: Optional[dict]) -> list[str]:
    saved = reader.metadata.get("data_fingerprint")
    if current is None or saved is None or ckpt.finetune or ckpt.allow_data_change:
        return []
    from megatron_lite.data.builder import fingerprint_differences
    return [f"training data differs from the data of iteration {reader.iteration}: {line}. Fix: resume with the "
            "checkpoint's --data-path/--split (see metadata.json 'data_fingerprint'), or pass --allow-data-change "
            "to continue on the new data (the sample order then differs from an uninterrupted run)."
            for line in fingerprint_differences(saved, current)]


def _other_files_read(reader: CheckpointReader, ckpt: Any, layout: dict, load_optim: bool) -> list[str]:
    """common.pt (optimizer and scheduler) and this rank's RNG file, when the load will read them."""
    files = [COMMON_FILE] if load_optim else []
    if not ckpt.finetune and not ckpt.no_load_rng and _same_layout(reader, layout):
        name = rng_file(layout["rank"])
        if name in reader.metadata.get("files", {}) or os.path.isfile(os.path.join(reader.path, name)):
            files.append(name)  # listed in the manifest: missing is an error, not 'RNG not restored'

    return files


def _same_layout(reader: CheckpointReader, layout: dict) -> bool:
    return all(reader.layout.get(k) == layout[k] for k in ("world_size", "tp", "pp"))


def _mismatch_message(load_dir: str, reader: Optional[CheckpointReader], config: Any, problems: list[str]) -> str:
    lines = [f"cannot load checkpoint {load_dir}:"] + [f"  {p}" for p in problems[:50]]
    if len(problems) > 50:
        lines.append(f"  ... and {len(problems) - 50} more")
    if not any(" shape " in p or "in the checkpoint" in p for p in problems):
        return "\n".join(lines)
    if reader is not None:
        saved = reader.config.get("model", {})
        current = config.to_dict().get("model", {}) if hasattr(config, "to_dict") else {}
        diffs = [f"{k}={saved[k]!r} (checkpoint) vs {current.get(k)!r} (now)" for k in sorted(saved)
                 if k in current and saved[k] != current[k]]
        if diffs:
            lines.append("model settings that differ: " + "; ".join(diffs))
    lines.append("Fix: build the model with the checkpoint's model flags (see metadata.json 'config'), "
                 "or convert the checkpoint with tools/checkpoint.")
    return "\n".join(lines)


def _read(reader: CheckpointReader, name: str, param: torch.Tensor, layout: dict, start: int, end: int,
          kind: str = "model", key: Optional[str] = None) -> torch.Tensor:
    """Flat [start, end) of this rank's local shard of `param` (of optimizer state `key`), read from only
    the saved pieces overlapping it, in any saved layout (checkpoint_slices.read_slice)."""
    return read_slice(reader, _source_name(name, param), _target(param, layout), start, end, kind, key)


def _load_model(reader: CheckpointReader, params: dict[str, torch.nn.Parameter], layout: dict,
                held: Optional[dict] = None) -> None:
    """Each parameter's held flat ranges (`held`: {name: (param, [(start, end, flat tensor)])}, default the
    whole parameter; ZeRO-3: its pieces of the persistent shard) from the pieces that overlap them."""
    with torch.no_grad():
        for name, param in params.items():
            if held is None or name not in held:
                param.data.copy_(_read(reader, name, param, layout, 0, param.numel()).view(param.shape).to(param.device))
                continue
            for start, end, flat in held[name][1]:
                flat.copy_(_read(reader, name, param, layout, start, end).to(flat.device))


def _optimizer_ranges_of(optimizer: Any, params: dict[str, torch.nn.Parameter]) -> dict[str, list]:
    """{name: [(start, end)]} of the optimizer state this rank will load."""
    if hasattr(optimizer, "local_parameter_state"):
        ranges: dict[str, list] = {}
        for name, start, end, _ in optimizer.local_parameter_state():
            ranges.setdefault(name, []).append((start, end))
        return ranges
    return {name: [(0, param.numel())] for name, param in params.items()}


def _load_optimizer_state(reader: CheckpointReader, optimizer: Any, params: dict[str, torch.nn.Parameter],
                          layout: dict) -> None:
    """Each rank reads only its own flat slices, from the saved pieces that overlap them, in any layout."""
    if not hasattr(optimizer, "set_local_parameter_state"):
        optimizer.set_parameter_state(_optimizer_states(reader, params, layout))
        return

    def state_for(name: str, start: int, end: int, key: str) -> torch.Tensor:
        return _read(reader, name, params[name], layout, start, end, "optim", key)

    optimizer.set_local_parameter_state(state_for)


def _optimizer_states(reader: CheckpointReader, params: dict[str, torch.nn.Parameter],
                      layout: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter optimizer state in this rank's local shapes, for an optimizer that takes whole
    parameters (set_parameter_state)."""
    states = {}
    for name, param in params.items():
        if not param.requires_grad:  # MoE expert biases: model state only, no optimizer state
            continue
        states[name] = {key: _read(reader, name, param, layout, 0, param.numel(), "optim", key).view(param.shape).clone()
                        for key in reader.optimizer_keys(_source_name(name, param))}
    return states


def _refresh_main_params(optimizer: Any, params: dict[str, torch.nn.Parameter]) -> None:
    """Without optimizer state (--no-load-optim, --finetune) the fp32 main copies must still follow the
    loaded (possibly bf16/fp16) weights."""
    optimizer.reload_model_params()


def _load_rng(reader: CheckpointReader, layout: dict) -> None:
    saved = reader.layout
    if not _same_layout(reader, layout):
        if layout["rank"] == 0:
            warnings.warn(f"checkpoint layout (world {saved.get('world_size')}, TP {saved.get('tp')}, PP {saved.get('pp')}) "
                          f"differs from this run's (world {layout['world_size']}, TP {layout['tp']}, PP {layout['pp']}): "
                          "RNG states are not restored (as in Megatron).")
        return
    path = os.path.join(reader.path, rng_file(layout["rank"]))
    if not os.path.isfile(path):
        warnings.warn(f"{path} is missing: RNG states are not restored.")
        return
    set_rng_state(reader.load_file(rng_file(layout["rank"])))
