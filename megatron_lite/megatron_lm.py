"""Megatron-LM checkpoints <-> megatron_lite canonical full tensors, without megatron-core.

Megatron-LM (megatron-core `GPTModel`) uses the parameter names megatron_lite uses (docs/internals.md)
and the same tensor layouts: group-interleaved QKV, SwiGLU's fc1 as [gate; up] split over TP with
stride 2, vocabulary rows padded to a multiple of make_vocab_size_divisible_by x TP. What differs is
the file layout, which this module reads and writes:

`--ckpt-format torch`::

    <save>/latest_checkpointed_iteration.txt        the iteration, or "release"
    <save>/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": argparse.Namespace (the model configuration), "checkpoint_version": 3.0, "iteration",
         "model": this rank's state dict (or "model0", "model1", ... with virtual pipeline stages),
         "optimizer", "rng_state", ...}

Layer numbers in a rank's state dict restart at 0 on every pipeline stage (and model chunk), and the
tied output layer is saved again on the last stage when PP > 1. `_extra_state` entries (None or bytes,
Transformer Engine's FP8 metadata) carry no weights.

`--ckpt-format torch_dist` (Megatron's default): a torch.distributed.checkpoint directory written by
megatron.core.dist_checkpointing (`.metadata`, `__R_N.distcp`, `common.pt` holding args, and
`metadata.json`). Layers are stacked: `decoder.layers.<name>` has a leading dimension of num_layers;
tensors are the global (TP-unsplit, vocabulary-padded) ones; norms use Transformer Engine's names
(`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`) whatever spec was used.

`model_optim_rng.pt` and `common.pt` are pickles holding an argparse Namespace with megatron-core enums
and numpy RNG state, so they need `torch.load(weights_only=False)`: this module does that only for
files under a directory the user named, and unpickles classes it cannot import (megatron-core absent)
as inert placeholders, so no megatron code is needed or run.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import types
from typing import Any, Callable, Optional

import torch

from megatron_lite.checkpoint_io import (CheckpointError, ParamMeta, TRACKER_FILE, atomic_torch_save, atomic_write_text,
                                         iteration_dir_name, param_meta_from_model)
from megatron_lite.config import Config, ConfigError
from megatron_lite.tensor_parallel.utils import pad_vocab_size

CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"
FORMATS = ("torch", "torch_dist")
# Transformer Engine spec names (always used by torch_dist) -> megatron_lite's (local spec) names.
TE_NORM_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                 "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
                 "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
                 "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?(?:_(\d+))?$")
# Modules of megatron-core's local spec whose state dict carries an `_extra_state` entry.
_EXTRA_STATE_LAYER = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


# ---- trusted unpickling, without megatron-core --------------------------------------------------
class _Placeholder:
    """Stands in for a pickled object whose class cannot be imported (e.g. a megatron-core enum)."""
    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self._qualname}{self.args!r}>"


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"_qualname": f"{module}.{name}"})


_LENIENT_PICKLE = types.ModuleType("megatron_lite_lenient_pickle")
_LENIENT_PICKLE.Unpickler = _LenientUnpickler
_LENIENT_PICKLE.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()
_LENIENT_PICKLE.__dict__.update(dumps=pickle.dumps, loads=pickle.loads, dump=pickle.dump)


def load_trusted(path: str) -> dict:
    """torch.load(weights_only=False) of a Megatron-LM pickle the user pointed us at (see module doc)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_LENIENT_PICKLE)
    except RuntimeError:  # mmap needs the zip format; older files are not
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LENIENT_PICKLE)


# ---- Megatron args <-> Config -----------------------------------------------------------------------
def _value(x: Any) -> Any:
    """An enum (real or placeholder) as its plain value."""
    if isinstance(x, _Placeholder):
        return x.args[0] if x.args else None
    return getattr(x, "value", x) if type(x).__module__ != "builtins" else x


def config_from_args(args: Any, vocab_size: Optional[int] = None) -> Config:
    """The megatron_lite Config (validated, TP=PP=1) of a Megatron-LM args Namespace. `vocab_size`: the
    real vocabulary (default: args.vocab_size + 1 for NullTokenizer, else the padded vocabulary)."""
    def get(name: str, default: Any = None) -> Any:
        return _value(getattr(args, name, default))

    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if get(k) is None]
    if missing:
        raise ConfigError(f"Megatron-LM args lack {missing}: not a GPT checkpoint's args.")
    unsupported = {"num_experts": "mixture-of-experts layers", "multi_latent_attention": "multi-latent attention",
                   "hybrid_override_pattern": "hybrid (Mamba) models",
                   "rotary_interleaved": "interleaved RoPE", "apply_layernorm_1p": "LayerNorm 1p",
                   "squared_relu": "squared ReLU",
                   "rotary_seq_len_interpolation_factor": "RoPE interpolation", "moe_layer_freq": None,
                   "mtp_num_layers": "multi-token prediction", "window_size": "sliding-window attention"}
    for name, what in unsupported.items():
        if what and get(name):
            raise ConfigError(f"Megatron-LM args: {name}={get(name)!r} ({what}) is not supported by megatron_lite.")
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = get("num_layers"), get("hidden_size"), get("num_attention_heads")
    m.ffn_hidden_size = get("ffn_hidden_size")
    kv = get("kv_channels")
    if kv and kv != m.hidden_size // m.num_attention_heads:
        m.kv_channels = kv
    # GPT-2 style args carry num_query_groups=1 with group_query_attention=False: only the flag counts.
    if get("group_query_attention"):
        m.group_query_attention, m.num_query_groups = True, get("num_query_groups")
    m.seq_length = get("seq_length") or get("max_position_embeddings")
    m.max_position_embeddings = get("max_position_embeddings") or m.seq_length
    position = get("position_embedding_type") or ("rope" if get("use_rotary_position_embeddings") else "learned_absolute")
    if position not in ("learned_absolute", "rope"):
        raise ConfigError(f"Megatron-LM args: position_embedding_type={position!r} is not supported (learned_absolute, rope).")
    m.position_embedding_type = position
    m.rotary_base = float(get("rotary_base", 10000) or 10000)
    m.rotary_percent = float(get("rotary_percent", 1.0) or 1.0)
    if get("use_rope_scaling"):  # Llama 3.x; Megatron fixes low/high frequency factors 1 and 4, context 8192
        m.use_rope_scaling, m.rope_scaling_factor = True, float(get("rope_scaling_factor", 8.0) or 8.0)
    m.normalization = get("normalization") or "LayerNorm"
    if m.normalization not in ("LayerNorm", "RMSNorm"):
        raise ConfigError(f"Megatron-LM args: normalization={m.normalization!r} is not supported (LayerNorm, RMSNorm).")
    m.norm_epsilon = float(get("norm_epsilon") or get("layernorm_epsilon") or 1e-5)
    m.swiglu = bool(get("swiglu"))
    m.add_bias_linear = bool(get("add_bias_linear", True))
    m.add_qkv_bias = bool(get("add_qkv_bias", False))
    m.qk_layernorm = bool(get("qk_layernorm", False))
    if not m.swiglu and not (get("openai_gelu") or (get("bias_gelu_fusion", True) and m.add_bias_linear)):
        # Megatron's MLP uses the exact (erf) GeLU unless the bias-GeLU fusion (tanh) or --openai-gelu is on.
        raise ConfigError("Megatron-LM args: the exact (erf) GeLU (--no-bias-gelu-fusion or --disable-bias-linear "
                          "without --swiglu) is not supported; megatron_lite's GeLU is the tanh approximation.")
    m.untie_embeddings_and_output_weights = bool(get("untie_embeddings_and_output_weights"))
    m.init_method_std = float(get("init_method_std", 0.02) or 0.02)
    m.hidden_dropout = float(get("hidden_dropout", 0.1) or 0.0)
    m.attention_dropout = float(get("attention_dropout", 0.1) or 0.0)
    m.make_vocab_size_divisible_by = int(get("make_vocab_size_divisible_by", 128) or 128)
    padded = get("padded_vocab_size")
    if vocab_size is None:
        if get("tokenizer_type") == "NullTokenizer" and get("vocab_size"):
            vocab_size = int(get("vocab_size")) + 1  # Megatron's NullTokenizer: ids 0..V-1 and eod = V
        else:
            vocab_size = padded
    if vocab_size is None:
        raise ConfigError("Megatron-LM args have no padded_vocab_size; give --true-vocab-size.")
    if padded is not None and vocab_size > padded:
        raise ConfigError(f"vocabulary size {vocab_size} exceeds the checkpoint's padded vocabulary {padded}.")
    m.vocab_size = int(vocab_size)
    d = cfg.data
    tokenizer = get("tokenizer_type")
    if tokenizer in ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"):
        d.tokenizer_type, d.tokenizer_model = tokenizer, get("tokenizer_model")
        d.vocab_file, d.merge_file = get("vocab_file"), get("merge_file")
    cfg.training.seed = int(get("seed", 1234) or 1234)
    cfg.extra["megatron_lm"] = {"padded_vocab_size": padded, "tokenizer_type": tokenizer}
    return cfg.validate()


def args_from_config(config: dict, tp: int, pp: int, vp: Optional[int], iteration: int, dtype: str) -> argparse.Namespace:
    """The Megatron-LM args Namespace of a megatron_lite config dict at a TP x PP(xVP) layout: what
    Megatron-LM's --use-checkpoint-args and its own convert.py loader read."""
    m, d = config["model"], config.get("data", {})
    if m.get("use_rope_scaling") and (m["rope_scaling_low_freq_factor"], m["rope_scaling_high_freq_factor"],
                                      m["rope_scaling_original_max_position_embeddings"]) != (1.0, 4.0, 8192):
        raise ConfigError("Llama 3 RoPE scaling with low/high frequency factors or original context other than "
                          "Megatron's fixed 1, 4 and 8192 cannot be expressed in Megatron-LM args.")
    heads = m["num_attention_heads"]
    groups = m.get("num_query_groups") or heads
    gqa = groups != heads
    padded = pad_vocab_size(m["vocab_size"], m["make_vocab_size_divisible_by"], tp)
    layers = m["num_layers"]
    return argparse.Namespace(
        num_layers=layers, hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=heads,
        kv_channels=m.get("kv_channels") or m["hidden_size"] // heads, group_query_attention=gqa,
        num_query_groups=groups if gqa else 1, seq_length=m["seq_length"],
        max_position_embeddings=m["max_position_embeddings"], position_embedding_type=m["position_embedding_type"],
        use_rotary_position_embeddings=m["position_embedding_type"] == "rope", rotary_base=int(m["rotary_base"]),
        rotary_percent=m["rotary_percent"], rotary_interleaved=False, use_rope_scaling=bool(m.get("use_rope_scaling")),
        rope_scaling_factor=m.get("rope_scaling_factor", 8.0), normalization=m["normalization"],
        norm_epsilon=m["norm_epsilon"], swiglu=m["swiglu"], add_bias_linear=m["add_bias_linear"],
        add_qkv_bias=m["add_qkv_bias"], bias_gelu_fusion=True, openai_gelu=False, squared_relu=False,
        apply_query_key_layer_scaling=False, qk_layernorm=bool(m.get("qk_layernorm")), num_experts=None,
        untie_embeddings_and_output_weights=m["untie_embeddings_and_output_weights"],
        init_method_std=m["init_method_std"], hidden_dropout=m["hidden_dropout"], attention_dropout=m["attention_dropout"],
        make_vocab_size_divisible_by=m["make_vocab_size_divisible_by"], padded_vocab_size=padded,
        vocab_size=m["vocab_size"] if d.get("tokenizer_type", "NullTokenizer") != "NullTokenizer" else m["vocab_size"] - 1,
        tokenizer_type=d.get("tokenizer_type", "NullTokenizer"), tokenizer_model=d.get("tokenizer_model"),
        vocab_file=d.get("vocab_file"), merge_file=d.get("merge_file"),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
        num_layers_per_virtual_pipeline_stage=layers // (pp * vp) if vp else None, expert_model_parallel_size=1,
        params_dtype=getattr(torch, dtype), fp16=dtype == "float16", bf16=dtype == "bfloat16",
        transformer_impl="local", ckpt_format="torch", iteration=iteration, consumed_train_samples=0,
        seed=config.get("training", {}).get("seed", 1234))


# ---- layout --------------------------------------------------------------------------------------
def stage_layers(args: Any, pp_rank: int, chunk: int) -> list[int]:
    """Global layer numbers of model chunk `chunk` on pipeline rank `pp_rank` in the saving layout."""
    from megatron_lite.pipeline.stages import layers_for_stage
    pp = int(_value(getattr(args, "pipeline_model_parallel_size", 1)) or 1)
    vp = _value(getattr(args, "virtual_pipeline_model_parallel_size", None))
    return layers_for_stage(int(args.num_layers), pp, pp_rank, vp, chunk,
                            _value(getattr(args, "decoder_first_pipeline_num_layers", None)),
                            _value(getattr(args, "decoder_last_pipeline_num_layers", None)))


def canonical_param_meta(config: Config) -> dict[str, ParamMeta]:
    """Names and sharding of every megatron_lite parameter (GPTModel on the meta device, TP=PP=1)."""
    from megatron_lite.models.gpt.model import GPTModel
    return param_meta_from_model([GPTModel(config, device=torch.device("meta"))])


def _rename_te(suffix: str) -> str:
    return TE_NORM_NAMES.get(suffix, suffix)


def resolve_iteration(path: str) -> str:
    """`path` may be a --save directory (tracker file) or one iteration's directory."""
    tracker = os.path.join(path, TRACKER_FILE)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        name = "release" if text == "release" else iteration_dir_name(int(text))
        path = os.path.join(path, name)
        if not os.path.isdir(path):
            raise CheckpointError(f"{tracker} names {text!r} but {path} does not exist.")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory.")
    return path


def detect_format(path: str) -> str:
    """'torch' or 'torch_dist' for an iteration directory, or an error naming what is there."""
    metadata = os.path.join(path, "metadata.json")
    if os.path.isfile(metadata):
        with open(metadata) as handle:
            values = json.load(handle)
        if "format_version" in values and "params" in values:
            raise CheckpointError(f"{path}: a megatron_lite checkpoint, not a Megatron-LM one; use --loader megatron_lite.")
    if os.path.isfile(os.path.join(path, ".metadata")):
        return "torch_dist"
    if any(_RANK_DIR.match(n) for n in os.listdir(path)):
        return "torch"
    raise CheckpointError(f"{path}: neither a Megatron-LM torch checkpoint (mp_rank_* directories) nor a torch_dist one "
                          f"(.metadata); found {sorted(os.listdir(path))[:10]}.")


# ---- reading ---------------------------------------------------------------------------------------
class MegatronCheckpointReader:
    """A Megatron-LM GPT checkpoint (either format) as megatron_lite canonical full tensors:
    `config` (validated, TP=PP=1), `param_meta`, `full_tensor(name)`, `iteration`."""

    def __init__(self, path: str, ckpt_format: Optional[str] = None, vocab_size: Optional[int] = None):
        self.path = resolve_iteration(path)
        found = detect_format(self.path)
        if ckpt_format not in (None, found):
            raise CheckpointError(f"{self.path}: --ckpt-format {ckpt_format} given, but this is a {found} checkpoint.")
        self.format = found
        self._cache: tuple[str, Optional[torch.Tensor]] = ("", None)
        if found == "torch":
            self._open_torch()
        else:
            self._open_dist()
        self.config = config_from_args(self.args, vocab_size)
        self.param_meta = canonical_param_meta(self.config)
        self.dtype = str(_value(getattr(self.args, "params_dtype", None)) or "torch.float32").replace("torch.", "")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            self.dtype = "bfloat16" if getattr(self.args, "bf16", False) else "float16" if getattr(self.args, "fp16", False) else "float32"
        self._check_names()

    # -- torch format: one pickle per (tp, pp) rank
    def _open_torch(self) -> None:
        ranks = {}
        for name in os.listdir(self.path):
            match = _RANK_DIR.match(name)
            if match and os.path.isfile(os.path.join(self.path, name, MODEL_FILE)):
                if match.group(3) is not None:
                    raise CheckpointError(f"{self.path}/{name}: expert-parallel ranks (mixture of experts) are not supported.")
                ranks[(int(match.group(1)), int(match.group(2) or 0))] = os.path.join(self.path, name, MODEL_FILE)
        if not ranks:
            raise CheckpointError(f"{self.path}: mp_rank_* directories hold no {MODEL_FILE}.")
        first = load_trusted(ranks[(0, 0)])
        self.args = self._args_of(first, ranks[(0, 0)])
        self.iteration = int(first.get("iteration", 0) or 0)
        self.tp = int(_value(getattr(self.args, "tensor_model_parallel_size", 1)) or 1)
        self.pp = int(_value(getattr(self.args, "pipeline_model_parallel_size", 1)) or 1)
        expected = {(t, p) for t in range(self.tp) for p in range(self.pp)}
        if set(ranks) != expected:
            raise CheckpointError(f"{self.path}: args say TP={self.tp} x PP={self.pp}, but rank files exist for "
                                  f"{sorted(ranks)}; the checkpoint is incomplete or its args are not its own.")
        vp = _value(getattr(self.args, "virtual_pipeline_model_parallel_size", None)) or 1
        # (our global name) -> [path of each TP rank's state dict, key in it]
        self._where: dict[str, list[tuple[tuple[int, int], str, str]]] = {}
        self._files: dict[tuple[int, int], dict] = {(0, 0): first}
        for (tp_rank, pp_rank), file in sorted(ranks.items()):
            blob = self._files.get((tp_rank, pp_rank)) or load_trusted(file)
            self._files[(tp_rank, pp_rank)] = blob
            chunks = ["model"] if "model" in blob else [f"model{v}" for v in range(vp)]
            missing = [c for c in chunks if c not in blob]
            if missing:
                raise CheckpointError(f"{file}: no model weights ({missing} missing; found keys {sorted(blob)}): "
                                      "an optimizer-only checkpoint cannot be converted.")
            for chunk_index, chunk in enumerate(chunks):
                layers = stage_layers(self.args, pp_rank, chunk_index if chunk != "model" else 0)
                for key in blob[chunk]:
                    name = self._global_name(key, layers, file)
                    if name is not None:
                        self._where.setdefault(name, []).append(((tp_rank, pp_rank), chunk, key))

    def _global_name(self, key: str, layers: list[int], file: str) -> Optional[str]:
        if key.endswith("_extra_state"):
            return None
        match = _LAYER.match(key)
        if match is None:
            return key
        local = int(match.group(1))
        if local >= len(layers):
            raise CheckpointError(f"{file}: {key} but this stage holds {len(layers)} layers per its args.")
        return f"decoder.layers.{layers[local]}.{_rename_te(match.group(2))}"

    @staticmethod
    def _args_of(blob: Any, file: str) -> Any:
        if not isinstance(blob, dict):
            raise CheckpointError(f"{file}: expected a dict, found {type(blob).__name__}.")
        if "args" not in blob or blob["args"] is None:
            raise CheckpointError(f"{file}: no 'args' (found keys {sorted(blob)}); the model configuration cannot be "
                                  "read. Was it saved by Megatron-LM's training loop?")
        return blob["args"]

    # -- torch_dist: a torch.distributed.checkpoint directory + common.pt
    def _open_dist(self) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        common = os.path.join(self.path, "common.pt")
        if not os.path.isfile(common):
            raise CheckpointError(f"{self.path}: torch_dist checkpoint without common.pt; its args cannot be read.")
        blob = load_trusted(common)
        self.args = self._args_of(blob, common)
        self.iteration = int(blob.get("iteration", 0) or 0)
        self.tp = int(_value(getattr(self.args, "tensor_model_parallel_size", 1)) or 1)
        self.pp = int(_value(getattr(self.args, "pipeline_model_parallel_size", 1)) or 1)
        self._reader = FileSystemReader(self.path)
        shapes = {k: v for k, v in self._reader.read_metadata().state_dict_metadata.items() if hasattr(v, "size")}
        self._dist_meta = shapes
        model_keys = [k for k in shapes if k.startswith(("embedding.", "decoder.", "output_layer."))]
        if not model_keys:
            raise CheckpointError(f"{self.path}: no model weights (found {sorted(shapes)[:8]}): an optimizer-only "
                                  "checkpoint cannot be converted.")
        self._where = {}
        layers = int(self.args.num_layers)
        for key in model_keys:
            if key.endswith("_extra_state"):
                continue
            match = _LAYER.match(key)
            if match:  # unstacked per-layer keys (some Megatron versions)
                self._where[f"decoder.layers.{match.group(1)}.{_rename_te(match.group(2))}"] = [((0, 0), key, "")]
            elif key.startswith("decoder.layers."):
                suffix = _rename_te(key[len("decoder.layers."):])
                if shapes[key].size[0] != layers:
                    raise CheckpointError(f"{self.path}: {key} stacks {shapes[key].size[0]} layers, args say {layers}.")
                for i in range(layers):
                    self._where[f"decoder.layers.{i}.{suffix}"] = [((0, 0), key, str(i))]
            else:
                self._where[key] = [((0, 0), key, "")]

    def _dist_tensor(self, key: str) -> torch.Tensor:
        if self._cache[0] != key:
            from torch.distributed.checkpoint import load
            meta = self._dist_meta[key]
            target = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
            load(target, storage_reader=self._reader, no_dist=True)
            self._cache = (key, target[key])
        return self._cache[1]

    # -- both
    def _check_names(self) -> None:
        expected = {n for n, meta in self.param_meta.items() if not meta.is_tied_copy}
        tied = not self.config.model.untie_embeddings_and_output_weights
        found = set(self._where) - ({"output_layer.weight"} if tied else set())
        unknown, missing = sorted(found - expected), sorted(expected - found)
        if unknown or missing:
            raise CheckpointError(f"{self.path}: not a GPT model megatron_lite can hold with these args: unexpected "
                                  f"{unknown[:8]}, missing {missing[:8]}.")

    def full_tensor(self, name: str) -> torch.Tensor:
        meta = self.param_meta[name]
        places = self._where[name]
        if self.format == "torch_dist":
            _, key, layer = places[0]
            full = self._dist_tensor(key)
            full = full[int(layer)] if layer else full
            if meta.shard.unpadded_size is not None:
                full = full.narrow(meta.shard.partition_dim, 0, meta.shard.unpadded_size)
        else:
            shards = [self._files[rank][chunk][key] for rank, chunk, key in places if rank[1] == places[0][0][1]]
            if not meta.shard.is_sharded:
                full = shards[0]
            else:
                if len(shards) != self.tp:
                    raise CheckpointError(f"{self.path}: {name} found on {len(shards)} TP ranks, expected {self.tp}.")
                full = meta.shard.unshard(shards)
        if list(full.shape) != list(meta.shape):
            raise CheckpointError(f"{self.path}: {name} has shape {list(full.shape)}, the args imply {meta.shape}.")
        return full.clone()


# ---- writing the torch format ------------------------------------------------------------------------
def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def write_torch_checkpoint(save_dir: str, config: dict, tensor: Callable[[str], torch.Tensor],
                           param_meta: dict[str, ParamMeta], tp: int, pp: int, vp: Optional[int] = None,
                           iteration: int = 0, dtype: str = "float32") -> str:
    """Write Megatron-LM's torch format at TP x PP(xVP) from canonical full tensors, one pipeline stage in
    memory at a time. Each rank's `model` state dict is what megatron-core's GPTModel.load_state_dict
    (local spec) accepts: local layer numbers, `_extra_state` None, padded vocabulary, the tied output
    copy on the last stage when PP > 1. `config` is a megatron_lite config dict valid at that layout."""
    args = args_from_config(config, tp, pp, vp, iteration, dtype)
    m = config["model"]
    tied = not m["untie_embeddings_and_output_weights"]
    padded = args.padded_vocab_size
    out = os.path.join(save_dir, iteration_dir_name(iteration))
    os.makedirs(out, exist_ok=True)
    for pp_rank in range(pp):
        states: list[dict] = [{} for _ in range(tp)]
        for chunk in range(vp or 1):
            layers = stage_layers(args, pp_rank, chunk)
            first, last = pp_rank == 0 and chunk == 0, pp_rank == pp - 1 and chunk == (vp or 1) - 1
            names: list[tuple[str, str]] = []  # (their local name, our name)
            if first:
                names += [(n, n) for n in param_meta if n.startswith("embedding.")]
            for local, layer in enumerate(layers):
                prefix = f"decoder.layers.{layer}."
                names += [(f"decoder.layers.{local}.{n[len(prefix):]}", n) for n in param_meta if n.startswith(prefix)]
            if last:
                names += [(n, n) for n in param_meta if n.startswith("decoder.final_layernorm.")]
                if not tied:
                    names.append(("output_layer.weight", "output_layer.weight"))
                elif not first:  # the last stage's copy of the tied embedding
                    names.append(("output_layer.weight", "embedding.word_embeddings.weight"))
            model_states: list[dict] = [{} for _ in range(tp)]
            for theirs, ours in names:
                meta = param_meta[ours]
                full = tensor(ours).to(getattr(torch, dtype))
                for tp_rank in range(tp):
                    if meta.shard.is_sharded:
                        dim = meta.shard.partition_dim
                        local_shape = list(meta.shape)
                        local_shape[dim] = (padded if meta.shard.unpadded_size is not None else meta.shape[dim]) // tp
                        shard = meta.shard.shard(full, tp_rank, tp, local_shape)
                    else:
                        shard = full
                    model_states[tp_rank][theirs] = shard.clone().contiguous()
            for tp_rank in range(tp):
                for local in range(len(layers)):
                    for module in _EXTRA_STATE_LAYER:
                        model_states[tp_rank][f"decoder.layers.{local}.{module}._extra_state"] = None
                if last and "output_layer.weight" in model_states[tp_rank]:
                    model_states[tp_rank]["output_layer._extra_state"] = None
                states[tp_rank]["model" if vp is None else f"model{chunk}"] = model_states[tp_rank]
        for tp_rank in range(tp):
            blob = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                    "num_floating_point_operations_so_far": 0, **states[tp_rank]}
            directory = os.path.join(out, rank_dir_name(tp_rank, pp_rank, pp))
            os.makedirs(directory, exist_ok=True)
            atomic_torch_save(blob, os.path.join(directory, MODEL_FILE))
    atomic_write_text(os.path.join(save_dir, TRACKER_FILE), f"{iteration}\n")
    return out
