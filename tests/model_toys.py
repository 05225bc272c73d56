"""Small real GPT models for tool tests (generation, conversion): a tiny GPT-2 or Llama style config, a
checkpoint written from a freshly initialised GPTModel at any layout, and the tools loaded as modules.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from megatron_lite.checkpoint_io import param_meta_from_model
from megatron_lite.checkpoint_offline import write_checkpoint_from_full_tensors
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny_config(style: str = "llama", vocab: int = 60, seq: int = 32, init_std: float | None = None) -> Config:
    """4 layers, hidden 32; "llama": RoPE, 8 heads in 2 query groups, SwiGLU (ffn 48), RMSNorm, no biases,
    untied; "gpt2": the defaults (learned positions, LayerNorm, GeLU, tied)."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.seq_length, m.vocab_size, m.make_vocab_size_divisible_by = 4, 32, seq, vocab, 8
    if init_std is not None:
        m.init_method_std = init_std
    if style == "llama":
        m.num_attention_heads, m.group_query_attention, m.num_query_groups = 8, True, 2
        m.position_embedding_type, m.swiglu, m.normalization = "rope", True, "RMSNorm"
        m.add_bias_linear, m.untie_embeddings_and_output_weights, m.ffn_hidden_size = False, True, 48
    return cfg


def write_model_checkpoint(directory: str, cfg: Config, iteration: int, tp: int = 1, pp: int = 1) -> None:
    """A freshly initialised GPTModel (built on one process) saved at iteration `iteration`, sharded to
    TP x PP; `cfg` records that layout."""
    from megatron_lite.models.gpt.model import GPTModel
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.world_size = tp * pp
    cfg.validate()
    single = Config.from_dict(cfg.to_dict())
    single.parallel.tensor_model_parallel_size = single.parallel.pipeline_model_parallel_size = 1
    single.world_size = 1
    model = GPTModel(single.validate())
    vocab = cfg.model.vocab_size
    tensors = {name: p.detach()[:vocab] if shard_spec_of(p).unpadded_size else p.detach()
               for name, p in model.named_parameters()}
    write_checkpoint_from_full_tensors(directory, iteration, cfg, tensors, param_meta_from_model([model]), tp=tp, pp=pp)


def load_tool(path: str):
    """A script under tools/ (e.g. "generate.py", "checkpoint/convert.py") imported as a module."""
    name = "tool_" + path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
