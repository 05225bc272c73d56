"""The offline checkpoint writer (the library side of tools/checkpoint/convert.py and of Hugging Face
import): a checkpoint for any TP/PP/VP layout written from canonical full tensors, one layer at a time,
without torch.distributed. The format itself (paths, metadata, atomic writes, the reader) is
checkpoint_io.py's."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Optional, Union

import torch

from megatron_lite.checkpoint_io import (COMMON_FILE, METADATA_FILE, CheckpointError, CheckpointReader, ParamMeta,
                                         atomic_torch_save, atomic_write_text, build_metadata, file_records,
                                         model_file, optim_file, prepare_tmp_dir, publish)

TensorSource = Union[Iterable[tuple[str, torch.Tensor]], Callable[[str], torch.Tensor]]


def write_checkpoint_from_full_tensors(save_dir: str, iteration: int, config: Any, tensors: TensorSource,
                                       param_meta: dict[str, ParamMeta], tp: int = 1, pp: int = 1,
                                       vp: Optional[int] = None, consumed_samples: int = 0,
                                       optimizer_states: Optional[Callable[[str], dict[str, torch.Tensor]]] = None,
                                       common: Optional[dict] = None,
                                       stage_of: Optional[Callable[[str], int]] = None) -> str:
    """Write a checkpoint for a target TP/PP(/VP) layout from canonical full tensors, without
    torch.distributed: offline resharding is CheckpointReader -> this; an HF import is HF weights -> this.

    `tensors` is an iterable of (name, full tensor) or a callable name -> full tensor (streaming: one
    parameter in memory at a time per shard file). `param_meta` gives each parameter's metadata (from
    `CheckpointReader.param_meta()` or `param_meta_from_model`). `optimizer_states(name)` optionally gives
    the full optimizer state per parameter, and `common` the optimizer/scheduler state dicts. Each
    parameter is placed on the pipeline stage `stage_of(name)` (default: `stage_of_param` for the target
    layout). The checkpoint is written to a .tmp directory and published like a training save.
    """
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    model_cfg = config_dict.get("model", {})
    stage_of = stage_of or (lambda name: stage_of_param(name, model_cfg.get("num_layers", 1), pp, vp, config_dict))
    source = tensors if callable(tensors) else dict(tensors).__getitem__
    os.makedirs(save_dir, exist_ok=True)
    tmp = prepare_tmp_dir(save_dir, iteration)
    metas: dict[str, ParamMeta] = {}
    by_stage: dict[int, list[str]] = {}
    for name, meta in param_meta.items():
        if meta.is_tied_copy:
            continue  # refilled from the embedding on load
        by_stage.setdefault(stage_of(name), []).append(name)
    # Stream one layer at a time: each layer (and the embedding / final-norm group) of a stage becomes
    # its own part file per TP rank, so memory stays near one layer's shards plus one full tensor.
    parallel = config_dict.get("parallel", {})
    etp = parallel.get("expert_tensor_parallel_size") or tp  # MoE experts (axis "etp") split over expert TP
    width = max(tp, etp)
    for pp_rank in range(pp):
        for part, names in enumerate(_layer_groups(by_stage.get(pp_rank, []))):
            model_shards: list[dict] = [{} for _ in range(width)]
            optim_shards: list[dict] = [{} for _ in range(width)]
            for name in names:
                # (the source's sharded-save pieces describe its files, not these)
                meta = dataclasses.replace(param_meta[name], pp_rank=pp_rank, pieces={}, shard_shapes=[])
                full = source(name)
                if list(full.shape) != list(meta.shape):
                    raise CheckpointError(f"{name}: given tensor shape {list(full.shape)} vs metadata shape {meta.shape}")
                states = optimizer_states(name) if optimizer_states is not None else None
                size = etp if meta.shard.axis == "etp" else tp
                ranks = range(size) if meta.shard.is_sharded else range(1)
                for tp_rank in ranks:
                    model_shards[tp_rank][name] = _shard(full, meta, tp_rank, size, model_cfg).to(meta.torch_dtype).contiguous()
                    if states is not None:
                        optim_shards[tp_rank][name] = {k: _shard(v, meta, tp_rank, size, model_cfg).contiguous()
                                                       for k, v in states.items()}
                meta.files = [model_file(t, pp_rank, part) for t in ranks]
                meta.dtype = str(meta.torch_dtype).replace("torch.", "")
                metas[name] = meta
                del full, states
            for tp_rank in range(width):
                if model_shards[tp_rank]:
                    atomic_torch_save(model_shards[tp_rank], os.path.join(tmp, model_file(tp_rank, pp_rank, part)))
                if optimizer_states is not None and optim_shards[tp_rank]:
                    atomic_torch_save(optim_shards[tp_rank], os.path.join(tmp, optim_file(tp_rank, pp_rank, part)))
    if common:
        atomic_torch_save(common, os.path.join(tmp, COMMON_FILE))
    layout = {"tp": tp, "pp": pp, "vp": vp, "dp": None, "world_size": None, "distributed_optimizer": False,
              "ep": parallel.get("expert_model_parallel_size") or 1, "etp": etp}
    files = file_records(tmp, [f for f in os.listdir(tmp) if not f.endswith(".partial")])
    metadata = build_metadata(iteration, consumed_samples, config_dict, layout, metas, optimizer_states is not None,
                              files=files)
    atomic_write_text(os.path.join(tmp, METADATA_FILE), json.dumps(metadata, indent=1))
    return publish(save_dir, iteration)


def reshard_checkpoint(src: str, dst: str, tp: int = 1, pp: int = 1, vp: Optional[int] = None,
                       with_optimizer: bool = True, iteration: Optional[int] = None) -> str:
    """Offline reshard: read `src` (a save directory or iter_N directory) and write it to `dst` for a
    TP/PP/VP layout, one parameter at a time. RNG states are dropped (they belong to the old ranks)."""
    with CheckpointReader(src) as reader:
        keep_optim = with_optimizer and reader.has_optimizer()
        common = reader.common() if keep_optim else {k: v for k, v in reader.common().items() if k != "optimizer"}
        return write_checkpoint_from_full_tensors(
            dst, reader.iteration if iteration is None else iteration, reader.config, reader.full_tensor,
            reader.param_meta(), tp=tp, pp=pp, vp=vp, consumed_samples=reader.consumed_samples,
            optimizer_states=reader.optimizer_full_state if keep_optim else None, common=common)


def _shard(full: torch.Tensor, meta: ParamMeta, tp_rank: int, tp_size: int, model_cfg: dict) -> torch.Tensor:
    if not meta.shard.is_sharded:
        return full
    local_shape = meta.local_shape(tp_size, model_cfg.get("make_vocab_size_divisible_by", 128))
    return meta.shard.shard(full, tp_rank, tp_size, local_shape)


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def _layer_groups(names: list[str]) -> list[list[str]]:
    """`names` split into consecutive groups: one per transformer layer, one for everything else."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _LAYER_RE.match(name)
        groups.setdefault(match.group(1) if match else "other", []).append(name)
    return list(groups.values())


def stage_of_param(name: str, num_layers: int, pp: int, vp: Optional[int] = None, config_dict: Optional[dict] = None) -> int:
    """The pipeline rank that holds `name` in a TP/PP/VP layout: embeddings on the first stage, final
    norm and output layer on the last, layers as the pipeline engine assigns them. The choice only
    organises files (loading follows each parameter's `files`)."""
    if pp == 1:
        return 0
    match = _LAYER_RE.match(name)
    if match is None:
        return 0 if name.startswith("embedding.") else pp - 1
    layer = int(match.group(1))
    parallel = (config_dict or {}).get("parallel", {})
    from megatron_lite.pipeline.stages import layers_for_stage
    first = parallel.get("decoder_first_pipeline_num_layers")
    last = parallel.get("decoder_last_pipeline_num_layers")
    for stage in range(pp):
        for chunk in range(vp or 1):
            if layer in layers_for_stage(num_layers, pp, stage, vp, chunk, first, last):
                return stage
    raise CheckpointError(f"{name}: layer {layer} is outside the model's {num_layers} layers.")
