"""Save and load training checkpoints, resharding on load to any TP / PP / VP / DP layout.

`save_checkpoint` writes `<save>/iter_NNNNNNN/` (format: see checkpoint_io.py) and then
`<save>/latest_checkpointed_iteration.txt`, as Megatron does. `load_checkpoint` restores model,
optimizer (distributed shards included), LR scheduler, loss scaler, RNG states and consumed samples,
honouring --no-load-optim, --no-load-rng and --finetune.

Departure from the target design ("torch.distributed.checkpoint underneath", docs/internals.md): a stride-2 SwiGLU fc1 shard
(a slice of the gate half and of the up half) and a padded vocab shard are not even DTensor shards, so
DCP cannot describe them. Instead each parameter is stored as its TP shards plus the metadata that
`tensor_parallel.utils.full_from_shards` needs; loading rebuilds the canonical full tensor and slices
it with `shard_of_full` for the new layout. Resharding is therefore one code path for every layout.

Crash safety: every rank writes into `<save>/iter_N.tmp`; each file goes to a temporary name, is
fsynced and renamed. Only when every rank has finished (barrier) does rank 0 rename the directory to
`iter_N` and then rewrite the tracker file, so a crash at any point leaves the previous checkpoint and
the tracker pointing at it intact. All communication goes through megatron_lite.collectives.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Optional

import numpy as np
import torch

from megatron_lite import collectives, parallel_state
from megatron_lite.checkpoint_io import (COMMON_FILE, EMBEDDING_NAME, METADATA_FILE, CheckpointError,
                                         CheckpointReader, ParamMeta, atomic_torch_save, atomic_write_text,
                                         build_metadata, file_records, is_tied_copy, iteration_dir_name, model_file, optim_name,
                                         param_meta_of, prepare_tmp_dir, publish, read_tracker, remove_stale_tmp_dirs, rng_file,
                                         strip_wrapper_prefix)
from megatron_lite.distributed.model_chunk import as_model_chunks
from megatron_lite.process_groups import ProcessGroups
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of

__all__ = ["save_checkpoint", "load_checkpoint", "read_tracker", "CheckpointError", "CheckpointReader"]


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
        # DP and CP ranks hold identical model/optimizer copies (after the optimizer's gather): rank 0 writes.
        "dp_rank": groups.dp_cp.rank, "world_size": groups.world.size, "rank": groups.world.rank,
        "distributed_optimizer": bool(config.parallel.use_distributed_optimizer),
        # MoE experts (ShardSpec axis "etp"): split over expert TP, held by one EP rank, replicated over expert DP.
        "ep": groups.ep.size, "etp": groups.etp.size, "etp_rank": groups.etp.rank, "ep_rank": groups.ep.rank, "edp_rank": groups.expert_dp.rank,
        "sharding_strategy": config.parallel.sharding_strategy,  # informational: every strategy saves one format
    }


def _named_params(model: Any) -> dict[str, torch.nn.Parameter]:
    """Every local parameter over all model chunks, by global name (chunks use global layer numbers)."""
    params: dict[str, torch.nn.Parameter] = {}
    for chunk in as_model_chunks(model):
        for name, param in chunk.sharded_state().items():  # waits for any overlapped param all-gather
            name = strip_wrapper_prefix(name)
            if name in params and params[name] is not param:
                raise CheckpointError(f"parameter name {name} appears in two model chunks; names must be global.")
            params[name] = param
    return params


def _axis(spec, layout: dict) -> tuple[int, int]:
    """(rank, size) of the group a parameter is split over: expert TP for MoE experts, else TP."""
    return (layout["etp_rank"], layout["etp"]) if spec.axis == "etp" else (layout["tp_rank"], layout["tp"])


def _writes(meta: ParamMeta, layout: dict) -> bool:
    """Whether this rank stores `meta`'s shard: DP rank 0 only (expert-DP rank 0 for MoE experts);
    replicated params only on TP rank 0."""
    if meta.shard.axis == "etp":
        return layout["edp_rank"] == 0
    if meta.is_tied_copy or layout["dp_rank"] != 0:
        return False
    return meta.shard.is_sharded or layout["tp_rank"] == 0


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
def save_checkpoint(iteration: int, model: Any, optimizer: Any, opt_param_scheduler: Any,
                    consumed_samples: int, config: Any, save_dir: Optional[str] = None,
                    groups: Optional[ProcessGroups] = None, data_fingerprint: Optional[dict] = None) -> str:
    """Save on every rank (collective); returns the published `<save>/iter_NNNNNNN` directory.
    `data_fingerprint` (data.builder.data_fingerprint) goes into metadata.json for load to compare."""
    save_dir = save_dir or config.checkpoint.save
    if not save_dir:
        raise CheckpointError("save_checkpoint: no directory. Pass --save DIR.")
    groups = _groups(groups)
    layout = _layout(config, groups)
    rank = layout["rank"]
    save_optim = optimizer is not None and not config.checkpoint.no_save_optim
    tmp = os.path.join(save_dir, f"iter_{iteration:07d}.tmp")
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        _remove_stale_tmp_dirs(save_dir)
        tmp = prepare_tmp_dir(save_dir, iteration)
    collectives.barrier(groups.world)

    params = _named_params(model)
    metas = {name: param_meta_of(name, p, _axis(shard_spec_of(p), layout)[1], layout["pp_rank"]) for name, p in params.items()}
    mine = {name for name, meta in metas.items() if _writes(meta, layout)}
    expert_file = model_file(layout["etp_rank"], layout["pp_rank"])[:-len(".pt")] + f"_ep{layout['ep_rank']}.pt"
    files = {name: expert_file if metas[name].shard.axis == "etp" else model_file(layout["tp_rank"], layout["pp_rank"])
             for name in mine}
    written = [rng_file(rank)]  # this rank's files, recorded (size, CRC-32) in the manifest
    states = optimizer.get_parameter_state() if save_optim else None  # collective over (expert) DP: every rank
    for filename in sorted(set(files.values())):
        names = sorted(name for name in mine if files[name] == filename)
        # copy=True: a parameter may be a view of a contiguous grad/param buffer; saving the view would
        # write the whole buffer.
        atomic_torch_save({name: params[name].detach().to("cpu", copy=True) for name in names}, os.path.join(tmp, filename))
        written.append(filename)
        if save_optim:
            written.append(optim_name(filename))
            atomic_torch_save({name: {k: v.detach().to("cpu", copy=True) for k, v in states[name].items()}
                               for name in names if name in states}, os.path.join(tmp, written[-1]))  # (not MoE expert biases)
    atomic_torch_save(get_rng_state(), os.path.join(tmp, rng_file(rank)))

    report = {name: (metas[name].to_json(), _axis(metas[name].shard, layout)[0], files.get(name)) for name in metas}
    reports = collectives.all_gather_object((report, file_records(tmp, written)), groups.world)
    if rank == 0:
        _write_common_and_metadata(tmp, iteration, consumed_samples, config, layout, reports,
                                   optimizer if save_optim else None, opt_param_scheduler,
                                   {} if data_fingerprint is None else {"data_fingerprint": data_fingerprint})
    collectives.barrier(groups.world)  # every rank's files are durable before the directory becomes visible
    final = os.path.join(save_dir, f"iter_{iteration:07d}")
    if rank == 0:
        publish(save_dir, iteration)
    collectives.barrier(groups.world)
    return final


def _write_common_and_metadata(tmp: str, iteration: int, consumed_samples: int, config: Any, layout: dict,
                               reports: list, optimizer: Any, opt_param_scheduler: Any, extra: dict) -> None:
    """Rank 0: common.pt, then the manifest (written last) with every rank's files' sizes and CRC-32s."""
    common = {}
    if optimizer is not None:
        common["optimizer"] = optimizer.state_dict()
    if opt_param_scheduler is not None:
        common["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    atomic_torch_save(common, os.path.join(tmp, COMMON_FILE))
    files = file_records(tmp, [COMMON_FILE])
    for _, records in reports:
        files.update(records)
    saved_layout = {k: layout[k] for k in ("tp", "pp", "vp", "dp", "world_size", "distributed_optimizer",
                                           "sharding_strategy", "ep", "etp")}
    metadata = build_metadata(iteration, consumed_samples, config.to_dict(), saved_layout,
                              _merge_reports([report for report, _ in reports]), optimizer is not None, files=files,
                              extra=extra)
    atomic_write_text(os.path.join(tmp, METADATA_FILE), json.dumps(metadata, indent=1))


def _remove_stale_tmp_dirs(save_dir: str) -> None:
    for path in remove_stale_tmp_dirs(save_dir):
        print(f"removed {path}: an unfinished save (the job died while writing it)", flush=True)


def _merge_reports(reports: list[dict]) -> dict[str, ParamMeta]:
    """Combine every rank's parameters into one entry per global name, with its files in TP order."""
    merged: dict[str, ParamMeta] = {}
    files: dict[str, dict[int, str]] = {}
    for report in reports:
        for name, (values, tp_rank, filename) in report.items():
            meta = ParamMeta.from_json(values)
            if meta.is_tied_copy:
                continue
            if name in merged and merged[name].shape != meta.shape:
                raise CheckpointError(f"{name}: ranks disagree on its full shape ({merged[name].shape} vs {meta.shape}).")
            merged.setdefault(name, meta)
            if filename is not None:
                files.setdefault(name, {})[tp_rank] = filename
    for name, meta in merged.items():
        meta.files = [files[name][t] for t in sorted(files.get(name, {}))]
    return merged


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
    params = _named_params(model)

    # Validate on every rank, then agree, so that every rank raises the same error instead of some
    # waiting forever in a collective.
    reader, problems = None, []
    load_optim = optimizer is not None and not ckpt.finetune and not ckpt.no_load_optim
    try:
        reader = CheckpointReader(load_dir)
        problems = _local_problems(reader, params, layout, load_optim, _other_files_read(reader, ckpt, layout, load_optim))
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

    _load_model(reader, params, layout)
    finetune = ckpt.finetune
    if load_optim:
        common = reader.common()
        if "optimizer" in common:
            optimizer.load_state_dict(common["optimizer"])
        optimizer.set_parameter_state(_optimizer_states(reader, params, layout))
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
    return {name: param_meta_of(name, p, _axis(shard_spec_of(p), layout)[1]).shape for name, p in params.items()}


def _source_name(name: str, param: torch.Tensor) -> str:
    """The checkpoint entry a local parameter is loaded from (the tied copy reads the embedding)."""
    return EMBEDDING_NAME if is_tied_copy(name, bool(getattr(param, "shared_embedding", False))) else name


def _local_problems(reader: CheckpointReader, params: dict[str, torch.nn.Parameter], layout: dict,
                    load_optim: bool, also: Iterable[str] = ()) -> list[str]:
    """Everything that would make this rank fail mid-load, found before any data is read."""
    if load_optim and not reader.has_optimizer():
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
            for filename in reader.params[source].files:
                needed_files.add(filename)
                if load_optim:
                    needed_files.add(optim_name(filename))
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


def _local_shard(full: torch.Tensor, param: torch.Tensor, layout: dict) -> torch.Tensor:
    rank, size = _axis(shard_spec_of(param), layout)
    return shard_spec_of(param).shard(full, rank, size, param.shape)


def _load_model(reader: CheckpointReader, params: dict[str, torch.nn.Parameter], layout: dict) -> None:
    with torch.no_grad():
        for name, param in params.items():
            local = _local_shard(reader.full_tensor(_source_name(name, param)), param, layout)
            param.data.copy_(local.to(param.device))


def _optimizer_states(reader: CheckpointReader, params: dict[str, torch.nn.Parameter],
                      layout: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter optimizer state in this rank's TP-local shapes (the optimizer slices its DP part)."""
    states = {}
    for name, param in params.items():
        if not param.requires_grad:  # MoE expert biases: model state only, no optimizer state
            continue
        full_states = reader.optimizer_full_state(_source_name(name, param))
        states[name] = {key: _local_shard(full, param, layout).clone() for key, full in full_states.items()}
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
