"""Convert checkpoints between megatron_lite layouts and Hugging Face, with Megatron's interface:

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver megatron_lite \\
        --load-dir ./Llama-3.2-1B --save-dir ./ckpt --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2
    python tools/checkpoint/convert.py --model-type GPT --loader megatron_lite --saver hf --load-dir ./ckpt --save-dir ./hf_out
    python tools/checkpoint/convert.py --model-type GPT --loader megatron_lite --saver megatron_lite \\
        --load-dir ./ckpt --save-dir ./ckpt_tp4 --target-tensor-parallel-size 4 --target-pipeline-parallel-size 1
    python tools/checkpoint/convert.py --model-type GPT --loader megatron --saver megatron_lite \\
        --load-dir ./megatron_lm_ckpt --save-dir ./ckpt          # Megatron-LM torch or torch_dist (auto)
    python tools/checkpoint/convert.py --model-type GPT --loader megatron_lite --saver megatron \\
        --load-dir ./ckpt --save-dir ./megatron_lm_ckpt --target-tensor-parallel-size 2  # Megatron-LM torch format

`megatron` and `mcore` name Megatron-LM's (megatron-core GPTModel) checkpoints, as in Megatron's own
convert.py; `megatron_lite` names this project's format (megatron_lite/megatron_lm.py has the details).

Everything passes through megatron_lite's canonical full tensors (docs/internals.md): a loader answers
"the full tensor of parameter NAME", a saver asks for one name (megatron_lite: one pipeline stage's
file at a time) or one layer (Hugging Face: one safetensors shard per layer) at a time, so memory
stays near one layer plus the embeddings (one pipeline stage for the megatron_lite saver, whose
format keeps a stage's shards in one file). Tokenizer files travel in `<save-dir>/tokenizer/`
(megatron_lite) or next to config.json (Hugging Face).
"""
from __future__ import annotations

import os
import sys

# This directory holds a file named inspect.py; drop it from the import path before anything imports
# the standard library's inspect (torch, dataclasses do).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import copy
import dataclasses
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_lite import hf_conversion as hfc  # noqa: E402
from megatron_lite import megatron_lm  # noqa: E402
from megatron_lite.checkpoint_io import (CheckpointError, CheckpointReader, ParamMeta, param_meta_from_model,  # noqa: E402
                                         read_tracker)
from megatron_lite.checkpoint_offline import write_checkpoint_from_full_tensors  # noqa: E402
from megatron_lite.config import Config, ConfigError  # noqa: E402

TOKENIZER_DIR = "tokenizer"  # <save>/tokenizer/: the tokenizer files of a megatron_lite checkpoint
# Megatron's tool names: `mcore` (and our `megatron`) is Megatron-LM's own format; `llama_mistral` reads HF.
LOADER_NAMES = {"megatron_lite": "megatron_lite", "megatron": "megatron_lm", "mcore": "megatron_lm", "hf": "hf",
                "llama_mistral": "hf"}


# ---- sources: a model as canonical full tensors ---------------------------------------------------
@dataclasses.dataclass
class Source:
    config: dict                                  # Config.to_dict()
    param_meta: dict[str, ParamMeta]              # every saved parameter (no tied copy)
    tensor: Callable[[str], torch.Tensor]         # name -> canonical full tensor
    tokenizer_dir: Optional[str] = None           # directory holding tokenizer files, if any
    iteration: int = 0
    consumed_samples: int = 0
    optimizer_state: Optional[Callable[[str], dict]] = None
    common: Optional[dict] = None
    dtype: str = "float32"


def model_param_meta(config: Config, dtype: str) -> dict[str, ParamMeta]:
    """Parameter metadata straight from GPTModel (the source of truth for names and sharding), built on
    the meta device with TP=PP=1 (no weights are drawn or allocated)."""
    from megatron_lite.models.gpt.model import GPTModel
    model = GPTModel(config, device=torch.device("meta"))
    metas = param_meta_from_model([model])
    return {name: dataclasses.replace(meta, dtype=dtype) for name, meta in metas.items()}


def _save_root(path: str) -> str:
    """The --save directory of a checkpoint path that may name an iter_NNNNNNN directory."""
    return path if read_tracker(path) is not None else os.path.dirname(os.path.abspath(path))


def load_megatron(path: str, with_optimizer: bool = True) -> Source:
    reader = CheckpointReader(path)
    config = reader.config
    tokenizer_dir = os.path.join(_save_root(path), TOKENIZER_DIR)
    if not os.path.isdir(tokenizer_dir):
        tokenizer_dir = _tokenizer_dir_from_config(config.get("data", {}))
    optimizer = with_optimizer and reader.has_optimizer()
    embedding = reader.param_meta().get("embedding.word_embeddings.weight")
    return Source(config=config, param_meta=reader.param_meta(), tensor=reader.full_tensor, tokenizer_dir=tokenizer_dir,
                  iteration=reader.iteration, consumed_samples=reader.consumed_samples,
                  optimizer_state=reader.optimizer_full_state if optimizer else None,
                  common=reader.common() if optimizer else None, dtype=embedding.dtype if embedding else "float32")


def _tokenizer_dir_from_config(data: dict) -> Optional[str]:
    """A trained checkpoint without <save>/tokenizer: the directory of the tokenizer it was trained with,
    if it is still there (HF tokenizer.json directories and GPT-2 vocab/merges in one directory)."""
    candidates = [data.get("tokenizer_model"), data.get("vocab_file")]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            directory = candidate if os.path.isdir(candidate) else os.path.dirname(os.path.abspath(candidate))
            if hfc.tokenizer_settings(directory) is not None:
                return directory
    return None


def load_megatron_lm(path: str, ckpt_format: Optional[str] = None, vocab_size: Optional[int] = None) -> Source:
    """A Megatron-LM checkpoint (torch or torch_dist format; the model weights only)."""
    reader = megatron_lm.MegatronCheckpointReader(path, ckpt_format, vocab_size)
    config = reader.config.to_dict()
    metas = {name: dataclasses.replace(meta, dtype=reader.dtype) for name, meta in reader.param_meta.items()}
    return Source(config=config, param_meta=metas, tensor=reader.full_tensor,
                  tokenizer_dir=_tokenizer_dir_from_config(config.get("data", {})), iteration=reader.iteration,
                  dtype=reader.dtype)


def load_hf(path: str) -> Source:
    hf = hfc.HFCheckpointReader(path)
    config = hfc.config_from_hf(hf.config)
    settings = hfc.tokenizer_settings(path)
    dtype = hf.dtype()
    metas = model_param_meta(config, dtype)
    weight_map = hfc.WeightMap(config.to_dict()["model"], config=config.to_dict())
    rules = {name: weight_map.rule(name) for name in metas}
    # Every HF tensor must be used and every needed one present: a mismatch means the config does not
    # describe the weights (e.g. biases the config says do not exist), which must not pass silently.
    needed = {hf_name for rule in rules.values() for hf_name in rule.hf_names}
    missing = sorted(n for n in needed if not hf.has(n))
    unused = sorted(n for n in hf.keys() if n not in needed and n.removeprefix("transformer.") not in
                    {x.removeprefix("transformer.") for x in needed}
                    and not (n == "lm_head.weight" and not config.model.untie_embeddings_and_output_weights))
    if missing or unused:
        raise ConfigError(f"{path}: weights do not match config.json: missing {missing[:10]}, unexpected {unused[:10]}.")

    def tensor(name: str) -> torch.Tensor:
        rule = rules[name]
        return rule.to_ours([hf.get(n) for n in rule.hf_names])
    return Source(config=config.to_dict(), param_meta=metas, tensor=tensor,
                  tokenizer_dir=path if (settings or os.path.isfile(os.path.join(path, "generation_config.json"))) else None,
                  dtype=dtype)


# ---- savers ---------------------------------------------------------------------------------------
def target_config(config: dict, tp: int, pp: int, vp: Optional[int], ep: int = 1, etp: Optional[int] = None) -> dict:
    """The source config re-validated for the target layout (so e.g. heads not divisible by TP fail here).
    MoE: experts over ETP x EP (folded over TP x DP), with sequence parallelism when TP > 1 (training needs it)."""
    values = copy.deepcopy(config)
    parallel = values.setdefault("parallel", {})
    is_moe = bool((values.get("moe") or {}).get("num_experts"))
    parallel.update(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    parallel.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=is_moe and tp > 1,
                    virtual_pipeline_model_parallel_size=vp, num_layers_per_virtual_pipeline_stage=None,
                    decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None)
    schedule = parallel.get("pipeline_schedule")
    if (vp is not None and schedule in ("gpipe", "1f1b", "zb-h1")) or (schedule == "zbv" and vp != 2) \
            or (vp is None and schedule == "interleaved"):
        parallel["pipeline_schedule"] = "auto"  # the source's schedule does not fit the target layout
    values["world_size"] = tp * pp * max(1, ep * (etp or tp) // tp)  # EP ranks come from data-parallel replicas
    values.setdefault("training", {})["global_batch_size"] = None  # the old one may not fit DP = 1 x PP
    values["training"]["rampup_batch_size"] = None
    # A machine-local scratch path, not part of the checkpoint (and validate() checks it is writable here).
    values.setdefault("optimizer", {})["optimizer_nvme_offload_dir"] = None
    try:
        cfg = Config.from_dict(values)
        cfg.training.global_batch_size = cfg.training.micro_batch_size * cfg.data_parallel_size * pp
        cfg.validate()
    except ConfigError as error:
        raise ConfigError(f"target layout TP={tp} PP={pp} VP={vp} EP={ep} ETP={etp or tp}: {error}") from None
    # Keep the user's batch settings: they are a training choice, not part of the checkpoint's layout.
    out = cfg.to_dict()
    out["training"] = config.get("training", out["training"])
    return out


def save_megatron(source: Source, save_dir: str, tp: int, pp: int, vp: Optional[int] = None, ep: int = 1,
                  etp: Optional[int] = None) -> str:
    config = target_config(source.config, tp, pp, vp, ep, etp)
    copied = hfc.copy_aux_files(source.tokenizer_dir, os.path.join(save_dir, TOKENIZER_DIR))
    settings = hfc.tokenizer_settings(os.path.join(save_dir, TOKENIZER_DIR)) if copied else None
    if settings:
        config["data"].update(settings)
    vp = config["parallel"]["virtual_pipeline_model_parallel_size"]
    return write_checkpoint_from_full_tensors(
        save_dir, source.iteration, config, source.tensor, source.param_meta, tp=tp, pp=pp, vp=vp,
        consumed_samples=source.consumed_samples, optimizer_states=source.optimizer_state, common=source.common)


def save_megatron_lm(source: Source, save_dir: str, tp: int, pp: int, vp: Optional[int] = None) -> str:
    """Megatron-LM's torch format at TP x PP(xVP) (model weights and args; no optimizer state)."""
    if (source.config.get("moe") or {}).get("num_experts"):
        raise ConfigError("--saver megatron: MoE models are not converted to Megatron-LM's format yet "
                          "(megatron_lite and Hugging Face savers support them).")
    config = target_config(source.config, tp, pp, vp)
    vp = config["parallel"]["virtual_pipeline_model_parallel_size"]
    return megatron_lm.write_torch_checkpoint(save_dir, config, source.tensor, source.param_meta, tp, pp, vp,
                                              source.iteration, source.dtype)


def save_hf(source: Source, save_dir: str) -> None:
    model = source.config["model"]
    weight_map = hfc.WeightMap(model, config=source.config)
    groups = [g for g in hfc.layer_groups(list(source.param_meta), model["num_layers"]) if g]
    writer = hfc.HFCheckpointWriter(save_dir, len(groups))
    for group in groups:  # one layer in memory at a time
        shard: dict[str, torch.Tensor] = {}
        for name in group:
            rule = weight_map.rule(name)
            shard.update(zip(rule.hf_names, rule.to_hf(source.tensor(name))))
        writer.add_shard(shard)
    writer.finish(hfc.hf_config_from_config(source.config, source.dtype))
    hfc.copy_aux_files(source.tokenizer_dir, save_dir)


# ---- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="GPT", choices=["GPT"], help="Only GPT (decoder-only) models.")
    parser.add_argument("--loader", required=True, choices=sorted(LOADER_NAMES), help="Source format.")
    parser.add_argument("--saver", required=True, choices=sorted(LOADER_NAMES), help="Target format.")
    parser.add_argument("--load-dir", required=True, help="megatron_lite --save dir (or iter_N dir), or an HF directory.")
    parser.add_argument("--save-dir", required=True, help="Where to write the converted checkpoint.")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1, help="megatron_lite saver: TP.")
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="megatron_lite saver: PP.")
    parser.add_argument("--target-virtual-pipeline-parallel-size", type=int, default=None,
                        help="megatron_lite saver: virtual stages per pipeline rank (interleaved 1F1B).")
    parser.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None,
                        help="megatron_lite saver: alternative way to give VP.")
    parser.add_argument("--target-expert-model-parallel-size", type=int, default=1,
                        help="megatron_lite saver, MoE: EP recorded in the checkpoint (loading reshards experts to any EP).")
    parser.add_argument("--target-expert-tensor-parallel-size", type=int, default=None,
                        help="megatron_lite saver, MoE: ETP the expert shards are written for (default: TP).")
    parser.add_argument("--no-optimizer", action="store_true", help="megatron_lite -> megatron_lite: drop optimizer state.")
    parser.add_argument("--ckpt-format", default=None, choices=list(megatron_lm.FORMATS),
                        help="megatron loader: Megatron-LM's checkpoint format (default: detected); the saver writes torch.")
    parser.add_argument("--true-vocab-size", type=int, default=None,
                        help="megatron loader: the real vocabulary size (default: args.vocab_size + 1 for "
                             "NullTokenizer, else the padded vocabulary).")
    return parser


def convert(args: argparse.Namespace) -> None:
    loader, saver = LOADER_NAMES[args.loader], LOADER_NAMES[args.saver]
    if loader == "hf":
        source = load_hf(args.load_dir)
    elif loader == "megatron_lm":
        source = load_megatron_lm(args.load_dir, args.ckpt_format, args.true_vocab_size)
    else:
        source = load_megatron(args.load_dir, not args.no_optimizer)
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    vp = args.target_virtual_pipeline_parallel_size
    if args.target_num_layers_per_virtual_pipeline_stage:
        vp = source.config["model"]["num_layers"] // (pp * args.target_num_layers_per_virtual_pipeline_stage)
    if saver == "hf":
        save_hf(source, args.save_dir)
        print(f"wrote Hugging Face {hfc.hf_config_from_config(source.config)['model_type']} model to {args.save_dir}")
    elif saver == "megatron_lm":
        if args.ckpt_format not in (None, "torch"):
            raise ConfigError(f"--saver {args.saver}: writes --ckpt-format torch only, got {args.ckpt_format}.")
        path = save_megatron_lm(source, args.save_dir, tp, pp, vp)
        print(f"wrote Megatron-LM torch checkpoint (TP={tp}, PP={pp}, VP={vp}) to {path}")
    else:
        ep, etp = args.target_expert_model_parallel_size, args.target_expert_tensor_parallel_size
        path = save_megatron(source, args.save_dir, tp, pp, vp, ep, etp)
        print(f"wrote megatron_lite checkpoint (TP={tp}, PP={pp}, VP={vp}, EP={ep}, ETP={etp or tp}) to {path}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
