"""Hugging Face <-> megatron_lite: the config mapping, the per-tensor weight mapping, and streaming
readers/writers of local Hugging Face model directories. No transformers import: only safetensors/torch.

Families: GPT-2 (`GPT2LMHeadModel`) and Llama-style decoders (`LlamaForCausalLM` with plain or Llama 3.x
scaled RoPE, plus Mistral, Qwen2 and Qwen3 dense where their fields fit: no sliding window, Qwen2's
QKV-only bias, Qwen3's per-head q/k RMSNorm). Every mapping is between a
megatron_lite canonical full tensor (docs/internals.md: global names, unpadded vocabulary, Megatron's
group-interleaved QKV, SwiGLU fc1 = [gate; up]) and the Hugging Face tensors it is made of.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from megatron_lite.config import Config, ConfigError

Tensor = torch.Tensor

LLAMA_LIKE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# Files that travel with the weights (tokenizer, generation defaults); copied along when present.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "tokenizer.model", "added_tokens.json", "generation_config.json")
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


# ---- config ---------------------------------------------------------------------------------------
def _rope_parameters(hf: dict, m) -> None:
    """RoPE base and scaling onto ModelConfig `m`: `rope_theta` + `rope_scaling` (transformers < 5) or
    `rope_parameters` (>= 5). Plain RoPE and Llama 3.x scaling (rope_type "llama3") are supported."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    m.rotary_base = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if rope_type == "llama3":
        values = {**scaling, **params}
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in values]
        if missing:
            raise ConfigError(f"HF config: rope type 'llama3' without {missing}.")
        m.use_rope_scaling = True
        m.rope_scaling_factor = float(values["factor"])
        m.rope_scaling_low_freq_factor = float(values["low_freq_factor"])
        m.rope_scaling_high_freq_factor = float(values["high_freq_factor"])
        m.rope_scaling_original_max_position_embeddings = int(values["original_max_position_embeddings"])
    elif rope_type != "default":
        raise ConfigError(f"HF config: rope type {rope_type!r} is not supported; plain RoPE ('default') and Llama 3.x "
                          "scaling ('llama3') are.")


def _hf_rope_parameters(m: dict) -> dict:
    """config.json's rope fields for a megatron_lite model dict (both transformers spellings)."""
    theta = float(m["rotary_base"])
    if not m.get("use_rope_scaling"):
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_scaling": None}
    scaling = {"rope_type": "llama3", "factor": m["rope_scaling_factor"], "low_freq_factor": m["rope_scaling_low_freq_factor"],
               "high_freq_factor": m["rope_scaling_high_freq_factor"],
               "original_max_position_embeddings": m["rope_scaling_original_max_position_embeddings"]}
    return {"rope_theta": theta, "rope_parameters": {**scaling, "rope_theta": theta}, "rope_scaling": scaling}


def config_from_hf(hf: dict) -> Config:
    """The megatron_lite Config (validated, TP=PP=1) of a Hugging Face config.json dict."""
    cfg = Config()
    m = cfg.model
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"HF GPT-2: activation {hf['activation_function']!r} unsupported (tanh GeLU only).")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or not hf.get("scale_attn_weights", True):
            raise ConfigError("HF GPT-2: non-standard attention scaling is not supported.")
        m.num_layers, m.hidden_size, m.num_attention_heads = hf["n_layer"], hf["n_embd"], hf["n_head"]
        m.ffn_hidden_size = hf.get("n_inner") or 4 * hf["n_embd"]
        m.max_position_embeddings = m.seq_length = hf["n_positions"]
        m.norm_epsilon = hf.get("layer_norm_epsilon", 1e-5)
        m.hidden_dropout, m.attention_dropout = hf.get("resid_pdrop", 0.1), hf.get("attn_pdrop", 0.1)
        m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", True)
    elif model_type in LLAMA_LIKE:
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"HF {model_type}: activation {hf['hidden_act']!r} unsupported (SwiGLU with silu only).")
        window = hf.get("sliding_window")
        if window is not None and (model_type == "mistral" or hf.get("use_sliding_window")) and window < hf["max_position_embeddings"]:
            raise ConfigError(f"HF {model_type}: sliding-window attention ({window}) is not supported.")
        heads = hf["num_attention_heads"]
        groups = hf.get("num_key_value_heads") or heads
        m.num_layers, m.hidden_size, m.num_attention_heads = hf["num_hidden_layers"], hf["hidden_size"], heads
        m.ffn_hidden_size = hf["intermediate_size"]
        if hf.get("head_dim") and hf["head_dim"] != hf["hidden_size"] // heads:
            m.kv_channels = hf["head_dim"]
        m.group_query_attention, m.num_query_groups = groups != heads, (groups if groups != heads else None)
        m.max_position_embeddings = m.seq_length = hf["max_position_embeddings"]
        m.position_embedding_type = "rope"
        _rope_parameters(hf, m)
        m.normalization, m.norm_epsilon, m.swiglu = "RMSNorm", hf.get("rms_norm_eps", 1e-6), True
        m.hidden_dropout, m.attention_dropout = 0.0, hf.get("attention_dropout", 0.0)
        m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
        if model_type in ("qwen2", "qwen2_moe"):  # q/k/v biases only
            m.add_bias_linear, m.add_qkv_bias = False, True
        elif model_type in ("qwen3", "qwen3_moe"):  # per-head q/k RMSNorm, no biases
            if hf.get("attention_bias"):
                raise ConfigError("HF qwen3: attention_bias=True (biases on q/k/v and o_proj only) cannot be expressed.")
            m.add_bias_linear, m.qk_layernorm = False, True
        else:
            attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
            if attention_bias != mlp_bias:
                raise ConfigError(f"HF {model_type}: attention_bias={attention_bias} with mlp_bias={mlp_bias} cannot be "
                                  "expressed (megatron_lite has biases on all linears or none, or QKV only).")
            m.add_bias_linear = attention_bias
    else:
        raise ConfigError(f"HF model_type {model_type!r} is not supported; use gpt2, {', '.join(LLAMA_LIKE)}.")
    if model_type in MOE_FAMILIES:
        _moe_from_hf(hf, cfg)
    m.vocab_size = hf["vocab_size"]  # the model's (canonical, unpadded) vocabulary, even if the tokenizer differs
    m.init_method_std = hf.get("initializer_range", 0.02)
    cfg.extra["hf_config"] = {k: hf[k] for k in ("model_type", "architectures", *_SPECIAL_IDS) if k in hf}
    return cfg.validate()


def _moe_from_hf(hf: dict, cfg: Config) -> None:
    """Mixtral / Qwen2-MoE / Qwen3-MoE routing: softmax over all experts, top-k, renormalised unless Qwen's
    norm_topk_prob is false (= megatron-core's default, or --moe-router-pre-softmax)."""
    moe, model_type, layers = cfg.moe, hf["model_type"], hf["num_hidden_layers"]
    moe.num_experts = hf.get("num_local_experts") if model_type == "mixtral" else hf.get("num_experts", hf.get("num_local_experts"))
    if not moe.num_experts or not hf.get("num_experts_per_tok"):
        raise ConfigError(f"HF {model_type}: config.json lacks the expert count or num_experts_per_tok.")
    moe.moe_router_topk = hf["num_experts_per_tok"]
    moe.moe_aux_loss_coeff = 0.0  # training choices are not part of the weights
    if model_type == "mixtral":
        moe.moe_ffn_hidden_size = hf["intermediate_size"]
        return
    moe.moe_ffn_hidden_size = hf["moe_intermediate_size"]
    moe.moe_router_pre_softmax = not hf.get("norm_topk_prob", model_type == "qwen3_moe")
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    moe.moe_layer_freq = str([0 if (i in dense or (i + 1) % step != 0) else 1 for i in range(layers)])
    if model_type == "qwen2_moe":
        moe.moe_shared_expert_intermediate_size, moe.moe_shared_expert_gate = hf["shared_expert_intermediate_size"], True


def _moe_family(config: dict) -> str:
    m, moe = config["model"], config["moe"]
    if m.get("qk_layernorm"):
        family = "qwen3_moe"
    elif moe.get("moe_shared_expert_intermediate_size") or m["add_qkv_bias"]:
        family = "qwen2_moe"
    else:
        family = "mixtral"
    shared = bool(moe.get("moe_shared_expert_intermediate_size"))
    if (family == "qwen2_moe") != (shared and moe.get("moe_shared_expert_gate")) or \
            moe.get("moe_router_score_function", "softmax") != "softmax" or moe.get("moe_router_group_topk") or \
            moe.get("moe_router_topk_scaling_factor") or moe.get("moe_router_enable_expert_bias") or \
            (family == "mixtral" and moe.get("moe_router_pre_softmax")) or \
            (family == "mixtral" and MoEConfigView(moe).pattern(m["num_layers"]) != [1] * m["num_layers"]):
        raise ConfigError("export of a MoE model to Hugging Face supports Mixtral (softmax top-k, every layer MoE), "
                          "Qwen2-MoE (shared expert with gate, q/k/v biases) and Qwen3-MoE (--qk-layernorm) routing only.")
    return family


class MoEConfigView:
    """The MoE section of a config dict, for its layer pattern."""

    def __init__(self, moe: dict) -> None:
        from megatron_lite.config import MoEConfig
        self.config = MoEConfig(**{k: v for k, v in moe.items()})

    def pattern(self, num_layers: int) -> list[int]:
        return self.config.layer_pattern(num_layers)


def _moe_to_hf(config: dict, hf: dict) -> None:
    m, moe = config["model"], config["moe"]
    hf["intermediate_size"] = m["ffn_hidden_size"]
    hf["num_experts_per_tok"] = moe["moe_router_topk"]
    if hf["model_type"] == "mixtral":
        hf.update(num_local_experts=moe["num_experts"], intermediate_size=moe["moe_ffn_hidden_size"], router_aux_loss_coef=0.0)
        return
    pattern = MoEConfigView(moe).pattern(m["num_layers"])
    hf.update(num_experts=moe["num_experts"], num_local_experts=moe["num_experts"], moe_intermediate_size=moe["moe_ffn_hidden_size"], decoder_sparse_step=1,
              mlp_only_layers=[i for i, x in enumerate(pattern) if x == 0], norm_topk_prob=not moe["moe_router_pre_softmax"],
              router_aux_loss_coef=0.0)
    if hf["model_type"] == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = moe["moe_shared_expert_intermediate_size"]


def hf_family(model: dict) -> str:
    """'gpt2' or 'llama' (or 'qwen2', 'qwen3'): the Hugging Face architecture a megatron_lite model config maps to."""
    learned = model["position_embedding_type"] == "learned_absolute"
    if learned and model["normalization"] == "LayerNorm" and not model["swiglu"]:
        if not model["add_bias_linear"] or model["num_query_groups"] not in (None, model["num_attention_heads"]) \
                or (model.get("kv_channels") or 0) not in (0, model["hidden_size"] // model["num_attention_heads"]):
            raise ConfigError("export to GPT-2 needs biases on all linears, multi-head attention and head_dim = hidden/heads.")
        return "gpt2"
    if not learned and model["normalization"] == "RMSNorm" and model["swiglu"]:
        if model.get("rotary_percent", 1.0) != 1.0:
            raise ConfigError("export to Llama needs --rotary-percent 1.0.")
        if model.get("qk_layernorm"):
            if model["add_bias_linear"]:
                raise ConfigError("export to Qwen3 (--qk-layernorm) needs --disable-bias-linear.")
            return "qwen3"
        return "qwen2" if (model["add_qkv_bias"] and not model["add_bias_linear"]) else "llama"
    raise ConfigError("export to Hugging Face supports GPT-2 style (learned positions, LayerNorm, GeLU) and Llama style "
                      "(RoPE, RMSNorm, SwiGLU) models only.")


def hf_config_from_config(config: dict, dtype: str = "float32") -> dict:
    """config.json for a megatron_lite config dict (`Config.to_dict()`, e.g. metadata.json's 'config')."""
    m = config["model"]
    family = hf_family(m)
    if (config.get("moe") or {}).get("num_experts"):
        family = _moe_family(config)
    saved = (config.get("extra") or {}).get("hf_config", {})
    heads = m["num_attention_heads"]
    head_dim = m.get("kv_channels") or m["hidden_size"] // heads
    tied = not m["untie_embeddings_and_output_weights"]
    if family == "gpt2":
        hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_layer": m["num_layers"], "n_embd": m["hidden_size"], "n_head": heads, "n_inner": m["ffn_hidden_size"],
              "n_positions": m["max_position_embeddings"], "layer_norm_epsilon": m["norm_epsilon"],
              "resid_pdrop": m["hidden_dropout"], "embd_pdrop": m["hidden_dropout"], "attn_pdrop": m["attention_dropout"],
              "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    else:
        # Keep Mistral's name on the way back; Qwen2 is the only family with QKV-only biases, Qwen3 with q/k norms.
        model_type = family if family in ("qwen2", "qwen3", *MOE_FAMILIES) else \
            ("mistral" if saved.get("model_type") == "mistral" else "llama")
        hf = {"architectures": [LLAMA_LIKE[model_type]], "model_type": model_type, "hidden_act": "silu",
              "num_hidden_layers": m["num_layers"], "hidden_size": m["hidden_size"], "intermediate_size": m["ffn_hidden_size"],
              "num_attention_heads": heads, "num_key_value_heads": m["num_query_groups"] or heads, "head_dim": head_dim,
              "max_position_embeddings": m["max_position_embeddings"], "rms_norm_eps": m["norm_epsilon"],
              # Both spellings: transformers < 5 reads rope_theta (+ rope_scaling), >= 5 rope_parameters.
              **_hf_rope_parameters(m), "attention_dropout": m["attention_dropout"]}
        if family == "llama":
            hf.update(attention_bias=m["add_bias_linear"], mlp_bias=m["add_bias_linear"])
        if model_type in ("mistral", "qwen2", "qwen3", *MOE_FAMILIES):
            hf.update(sliding_window=None, use_sliding_window=False)
        if model_type in MOE_FAMILIES:
            _moe_to_hf(config, hf)
        if model_type in ("qwen3", "qwen3_moe"):
            if m["add_qkv_bias"]:
                raise ConfigError("export to Qwen3 cannot carry QKV-only biases (--add-qkv-bias).")
            hf.update(attention_bias=False)
    hf.update(vocab_size=m["vocab_size"], tie_word_embeddings=tied, initializer_range=m["init_method_std"],
              dtype=dtype, torch_dtype=dtype, use_cache=True)
    hf.update({k: saved[k] for k in _SPECIAL_IDS if k in saved})
    return hf


# ---- weight mapping -------------------------------------------------------------------------------
def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int, head_dim: int) -> Tensor:
    """HF's separate q [heads*d, ...], k and v [groups*d, ...] -> Megatron's group-interleaved QKV
    [groups * (heads_per_group + 2) * d, ...] (each group's queries, then its key, then its value)."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, head_dim, *rest)
    k, v = k.reshape(groups, 1, head_dim, *rest), v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, heads: int, groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of interleave_qkv."""
    per_group = heads // groups
    rest = qkv.shape[1:]
    w = qkv.reshape(groups, per_group + 2, head_dim, *rest)
    return (w[:, :per_group].reshape(heads * head_dim, *rest), w[:, per_group].reshape(groups * head_dim, *rest),
            w[:, per_group + 1].reshape(groups * head_dim, *rest))


@dataclass
class Rule:
    """One megatron_lite tensor <-> the Hugging Face tensors it is made of."""
    hf_names: tuple[str, ...]
    to_ours: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]


def _same(name: str) -> Rule:
    return Rule((name,), lambda ts: ts[0], lambda t: [t])


def _transposed(name: str) -> Rule:  # GPT-2's Conv1D stores [in, out]
    return Rule((name,), lambda ts: ts[0].t(), lambda t: [t.t()])


def _qkv_rule(names: tuple[str, str, str], heads: int, groups: int, head_dim: int, conv1d_fused: bool) -> Rule:
    sizes = [heads * head_dim, groups * head_dim, groups * head_dim]
    if conv1d_fused:  # GPT-2 c_attn: one [in, 3h] tensor (weight) or [3h] (bias) holding [q; k; v]
        def to_ours(ts: list[Tensor]) -> Tensor:
            t = ts[0].t() if ts[0].dim() == 2 else ts[0]
            return interleave_qkv(*torch.split(t, sizes, dim=0), groups, head_dim)

        def to_hf(t: Tensor) -> list[Tensor]:
            fused = torch.cat(split_qkv(t, heads, groups, head_dim), dim=0)
            return [fused.t() if fused.dim() == 2 else fused]
        return Rule(names[:1], to_ours, to_hf)
    return Rule(names, lambda ts: interleave_qkv(ts[0], ts[1], ts[2], groups, head_dim),
                lambda t: list(split_qkv(t, heads, groups, head_dim)))


def _rules(model: dict, family: str, num_experts: int = 0) -> tuple[dict[str, Rule], dict[str, Rule], str]:
    """(rules for global tensors by our name, rules for a layer's tensors by our suffix, HF layer prefix)."""
    heads, groups = model["num_attention_heads"], model["num_query_groups"] or model["num_attention_heads"]
    head_dim = model.get("kv_channels") or model["hidden_size"] // heads
    bias = model["add_bias_linear"]
    if family == "gpt2":
        top = {"embedding.word_embeddings.weight": _same("transformer.wte.weight"),
               "embedding.position_embeddings.weight": _same("transformer.wpe.weight"),
               "decoder.final_layernorm.weight": _same("transformer.ln_f.weight"),
               "decoder.final_layernorm.bias": _same("transformer.ln_f.bias"),
               "output_layer.weight": _same("lm_head.weight")}
        layer = {"input_layernorm.weight": _same("ln_1.weight"), "input_layernorm.bias": _same("ln_1.bias"),
                 "pre_mlp_layernorm.weight": _same("ln_2.weight"), "pre_mlp_layernorm.bias": _same("ln_2.bias"),
                 "self_attention.linear_qkv.weight": _qkv_rule(("attn.c_attn.weight",) * 3, heads, groups, head_dim, True),
                 "self_attention.linear_qkv.bias": _qkv_rule(("attn.c_attn.bias",) * 3, heads, groups, head_dim, True),
                 "self_attention.linear_proj.weight": _transposed("attn.c_proj.weight"),
                 "self_attention.linear_proj.bias": _same("attn.c_proj.bias"),
                 "mlp.linear_fc1.weight": _transposed("mlp.c_fc.weight"), "mlp.linear_fc1.bias": _same("mlp.c_fc.bias"),
                 "mlp.linear_fc2.weight": _transposed("mlp.c_proj.weight"), "mlp.linear_fc2.bias": _same("mlp.c_proj.bias")}
        return top, layer, "transformer.h.{}."
    top = {"embedding.word_embeddings.weight": _same("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": _same("model.norm.weight"),
           "output_layer.weight": _same("lm_head.weight")}
    gate_up = Rule(("mlp.gate_proj.weight", "mlp.up_proj.weight"), torch.cat, lambda t: list(torch.chunk(t, 2, dim=0)))
    gate_up_bias = Rule(("mlp.gate_proj.bias", "mlp.up_proj.bias"), torch.cat, lambda t: list(torch.chunk(t, 2, dim=0)))
    layer = {"input_layernorm.weight": _same("input_layernorm.weight"),
             "pre_mlp_layernorm.weight": _same("post_attention_layernorm.weight"),
             "self_attention.linear_qkv.weight": _qkv_rule(tuple(f"self_attn.{x}_proj.weight" for x in "qkv"), heads, groups, head_dim, False),
             "self_attention.linear_qkv.bias": _qkv_rule(tuple(f"self_attn.{x}_proj.bias" for x in "qkv"), heads, groups, head_dim, False),
             "self_attention.linear_proj.weight": _same("self_attn.o_proj.weight"),
             "mlp.linear_fc1.weight": gate_up, "mlp.linear_fc2.weight": _same("mlp.down_proj.weight")}
    if model.get("qk_layernorm"):
        layer.update({"self_attention.q_layernorm.weight": _same("self_attn.q_norm.weight"),
                      "self_attention.k_layernorm.weight": _same("self_attn.k_norm.weight")})
    if bias:
        layer.update({"self_attention.linear_proj.bias": _same("self_attn.o_proj.bias"), "mlp.linear_fc1.bias": gate_up_bias,
                      "mlp.linear_fc2.bias": _same("mlp.down_proj.bias")})
    if family in MOE_FAMILIES:
        layer.update(_moe_rules(family, num_experts))
    return top, layer, "model.layers.{}."


def _moe_rules(family: str, num_experts: int) -> dict[str, Rule]:
    """Router, experts (by global index; fc1 = [gate; up]) and Qwen2-MoE's shared expert and its gate."""
    def gate_up(gate: str, up: str) -> Rule:
        return Rule((gate, up), torch.cat, lambda t: list(torch.chunk(t, 2, dim=0)))
    prefix = "block_sparse_moe." if family == "mixtral" else "mlp."
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    rules = {"mlp.router.weight": _same(prefix + "gate.weight")}
    for e in range(num_experts):
        g, u, d = (f"{prefix}experts.{e}.{n}.weight" for n in names)
        rules[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up(g, u)
        rules[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = _same(d)
    if family == "qwen2_moe":
        rules.update({"mlp.shared_experts.linear_fc1.weight": gate_up("mlp.shared_expert.gate_proj.weight",
                                                                      "mlp.shared_expert.up_proj.weight"),
                      "mlp.shared_experts.linear_fc2.weight": _same("mlp.shared_expert.down_proj.weight"),
                      "mlp.shared_experts.gate_weight": _same("mlp.shared_expert_gate.weight")})
    return rules


class WeightMap:
    """Per-name mapping for one model config: `rule(our_name)` -> Rule with full HF names."""

    def __init__(self, model: dict, family: Optional[str] = None, config: Optional[dict] = None):
        """`config` (the whole config dict) is needed for MoE models: it holds the "moe" section."""
        moe = (config or {}).get("moe") or {}
        self.family = family or (_moe_family(config) if moe.get("num_experts") else hf_family(model))
        self.top, self.layer, self.layer_prefix = _rules(model, self.family, moe.get("num_experts") or 0)

    def rule(self, name: str) -> Rule:
        if name in self.top:
            return self.top[name]
        parts = name.split(".", 3)  # decoder.layers.{i}.{suffix}
        if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[3] in self.layer:
            base, prefix = self.layer[parts[3]], self.layer_prefix.format(parts[2])
            return Rule(tuple(prefix + n for n in base.hf_names), base.to_ours, base.to_hf)
        raise KeyError(f"no Hugging Face {self.family} equivalent for megatron_lite parameter {name!r}")


# ---- reading a Hugging Face directory -------------------------------------------------------------
# Tensors Hugging Face keeps in some checkpoints that are not weights (causal-mask and RoPE buffers).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class HFCheckpointReader:
    """Lazy access to the tensors of a local HF directory: model.safetensors, sharded safetensors with
    an index, or pytorch_model.bin (memory-mapped). Only the requested tensor is read."""

    def __init__(self, path: str):
        self.path = path
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path}: no config.json; --load-dir must be a local Hugging Face model directory.")
        with open(config_path) as handle:
            self.config: dict = json.load(handle)
        self._where: dict[str, str] = {}
        self._open: dict[str, Any] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = os.path.join(path, index_name)
            if os.path.isfile(index):
                with open(index) as handle:
                    self._where = dict(json.load(handle)["weight_map"])
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if os.path.isfile(os.path.join(path, single)):
                    self._where = {name: single for name in self._file(single).keys()}
                    break
            else:
                raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or their index).")

    def _file(self, filename: str) -> Any:
        if filename not in self._open:
            full = os.path.join(self.path, filename)
            if filename.endswith(".safetensors"):
                from safetensors import safe_open
                self._open[filename] = safe_open(full, framework="pt")
            else:
                self._open[filename] = torch.load(full, map_location="cpu", mmap=True, weights_only=True)
        return self._open[filename]

    def keys(self) -> list[str]:
        return [k for k in self._where if not k.endswith(_IGNORED_SUFFIXES)]

    def _resolve(self, name: str) -> str:
        if name in self._where:
            return name
        # GPT-2 checkpoints saved from GPT2Model (e.g. the original 'gpt2') have no 'transformer.' prefix.
        for alias in (name.removeprefix("transformer."), "transformer." + name):
            if alias in self._where:
                return alias
        raise KeyError(f"{self.path}: tensor {name!r} not found")

    def has(self, name: str) -> bool:
        try:
            self._resolve(name)
            return True
        except KeyError:
            return False

    def get(self, name: str) -> Tensor:
        key = self._resolve(name)
        handle = self._file(self._where[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]

    def dtype(self) -> str:
        name = next(iter(self.keys()))
        return str(self.get(name).dtype).replace("torch.", "")


# ---- writing a Hugging Face directory -------------------------------------------------------------
class HFCheckpointWriter:
    """Writes one safetensors shard per `add_shard` call plus model.safetensors.index.json, so an
    export holds one layer in memory at a time."""

    def __init__(self, path: str, num_shards: int):
        os.makedirs(path, exist_ok=True)
        self.path, self.num_shards, self.count = path, num_shards, 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add_shard(self, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file
        self.count += 1
        filename = f"model-{self.count:05d}-of-{self.num_shards:05d}.safetensors"
        # clone: safetensors refuses views that share storage (e.g. split q/k/v of one tensor).
        tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        save_file(tensors, os.path.join(self.path, filename), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            self.weight_map[name] = filename
            self.total_bytes += tensor.numel() * tensor.element_size()

    def finish(self, config: dict) -> None:
        if self.count != self.num_shards:
            raise RuntimeError(f"wrote {self.count} shards, announced {self.num_shards}")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as handle:
            json.dump(index, handle, indent=2)
        with open(os.path.join(self.path, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)


def copy_aux_files(src: Optional[str], dst: str) -> list[str]:
    """Copy tokenizer files (and generation_config.json) from `src` to `dst`; returns the copied names."""
    copied = []
    if src and os.path.isdir(src):
        for name in AUX_FILES:
            if os.path.isfile(os.path.join(src, name)):
                os.makedirs(dst, exist_ok=True)
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
                copied.append(name)
    return copied


def tokenizer_settings(directory: str) -> Optional[dict]:
    """DataConfig fields (tokenizer_type, tokenizer_model, vocab_file, merge_file) for the tokenizer
    files in `directory`, or None when there is none."""
    def path(name: str) -> str:
        return os.path.abspath(os.path.join(directory, name))
    if os.path.isfile(path("tokenizer.json")):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": os.path.abspath(directory)}
    if os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": path("vocab.json"), "merge_file": path("merges.txt")}
    if os.path.isfile(path("tokenizer.model")):
        return {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": path("tokenizer.model")}
    return None


def layer_groups(names: Iterable[str], num_layers: int) -> list[list[str]]:
    """Parameter names grouped for streaming: embeddings first, then one group per layer, then the rest."""
    first = [n for n in names if n.startswith("embedding.")]
    layers = [[n for n in names if n.startswith(f"decoder.layers.{i}.")] for i in range(num_layers)]
    grouped = set(first).union(*layers)
    return [first, *layers, [n for n in names if n not in grouped]]
