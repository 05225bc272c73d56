"""megatron_lite.hf_conversion: QKV interleaving, config mapping both ways, per-tensor rules, and the
Qwen2 (QKV bias) / Mistral / biased Llama variants against transformers models built from a config."""
from __future__ import annotations

import pytest
import torch

from megatron_lite import hf_conversion as hfc
from megatron_lite.config import ConfigError
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of


@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 4), (6, 1)])
def test_interleave_and_split_qkv_are_inverse(heads, groups):
    d, h = 3, 5
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    fused = hfc.interleave_qkv(q, k, v, groups, d)
    assert fused.shape == ((heads + 2 * groups) * d, h)
    # Group 0 holds its heads' queries, then its key, then its value.
    per_group = heads // groups
    assert torch.equal(fused[:per_group * d], q[:per_group * d])
    assert torch.equal(fused[per_group * d:(per_group + 1) * d], k[:d])
    for a, b in zip(hfc.split_qkv(fused, heads, groups, d), (q, k, v)):
        assert torch.equal(a, b)
    bias = hfc.interleave_qkv(q[:, 0], k[:, 0], v[:, 0], groups, d)
    assert torch.equal(bias, fused[:, 0])


def _llama_hf(**overrides) -> dict:
    hf = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
          "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 100,
          "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
          "tie_word_embeddings": False, "hidden_act": "silu", "eos_token_id": 7}
    hf.update(overrides)
    return hf


def test_config_round_trip_llama_and_gpt2():
    cfg = hfc.config_from_hf(_llama_hf())
    m = cfg.model
    assert (m.num_query_groups, m.group_query_attention, m.rotary_base, m.swiglu, m.normalization) == (2, True, 1e6, True, "RMSNorm")
    assert m.untie_embeddings_and_output_weights and not m.add_bias_linear and m.vocab_size == 100
    back = hfc.hf_config_from_config(cfg.to_dict())
    assert back["num_key_value_heads"] == 2 and back["rope_theta"] == 1e6 and back["eos_token_id"] == 7
    assert back["architectures"] == ["LlamaForCausalLM"]
    gpt2 = hfc.config_from_hf({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64,
                               "vocab_size": 100, "n_inner": None, "layer_norm_epsilon": 1e-5})
    assert gpt2.model.ffn_hidden_size == 128 and not gpt2.model.untie_embeddings_and_output_weights
    assert hfc.hf_config_from_config(gpt2.to_dict())["model_type"] == "gpt2"


@pytest.mark.parametrize("bad", [
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},  # llama3 without its band parameters
    {"hidden_act": "gelu"},
    {"attention_bias": True, "mlp_bias": False},
    {"model_type": "mistral", "sliding_window": 16},
    {"model_type": "mixtral"},  # a MoE config without its expert count
    {"model_type": "deepseek_v3"},
])
def test_unsupported_hf_configs_fail_with_a_reason(bad):
    with pytest.raises(ConfigError):
        hfc.config_from_hf(_llama_hf(**bad))


def test_rules_cover_every_parameter_and_invert():
    from megatron_lite.models.gpt.model import GPTModel
    cfg = hfc.config_from_hf(_llama_hf(attention_bias=True, mlp_bias=True))
    model = GPTModel(cfg)
    weight_map = hfc.WeightMap(cfg.to_dict()["model"])
    seen = set()
    for name, param in model.named_parameters():
        rule = weight_map.rule(name)
        assert not seen & set(rule.hf_names)
        seen |= set(rule.hf_names)
        full = param.detach()[:100] if shard_spec_of(param).unpadded_size else param.detach()
        assert torch.equal(rule.to_ours(rule.to_hf(full)), full), name
    assert "model.layers.1.self_attn.o_proj.bias" in seen and "model.layers.0.mlp.up_proj.bias" in seen
    with pytest.raises(KeyError):
        weight_map.rule("decoder.layers.0.unknown.weight")


@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama_bias"])
def test_variants_load_into_transformers_and_match_logits(family, tmp_path):
    """Import (HF -> canonical tensors) for Qwen2 / Mistral / biased Llama, then logits equal HF's (atol 1e-5)."""
    transformers = pytest.importorskip("transformers")
    import importlib.util
    import os
    import sys
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=family == "qwen2",
                  initializer_range=0.2)
    torch.manual_seed(0)
    if family == "qwen2":
        hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "mistral":
        hf_model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    else:
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=True, mlp_bias=True, **common))
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    spec = importlib.util.spec_from_file_location("tool_convert_unit", os.path.join(root, "tools", "checkpoint", "convert.py"))
    convert = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = convert
    spec.loader.exec_module(convert)
    assert convert.main(["--loader", "hf", "--saver", "megatron_lite", "--load-dir", str(tmp_path / "hf"),
                         "--save-dir", str(tmp_path / "ml")]) == 0
    assert convert.main(["--loader", "megatron_lite", "--saver", "hf", "--load-dir", str(tmp_path / "ml"),
                         "--save-dir", str(tmp_path / "back")]) == 0
    reloaded, info = type(hf_model).from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    from megatron_lite.inference import inference_config, load_model, pipeline_forward
    model = load_model(inference_config(str(tmp_path / "ml")))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pipeline_forward(model, ids, torch.arange(12)[None])
        torch.testing.assert_close(ours, hf_model.eval()(ids).logits, rtol=0, atol=1e-5)  # measured <= 9.5e-7
        torch.testing.assert_close(reloaded.eval()(ids).logits, hf_model(ids).logits, rtol=0, atol=0)
