"""Llama 3.x RoPE scaling (HF rope_type "llama3", Megatron's --use-rope-scaling) against transformers,
from a small config (random weights, never downloaded).

The config's original context (256) and head_dim 8 put one RoPE frequency in each of Llama 3's three
bands (kept, smoothly interpolated, divided by the factor), so a wrong band cannot hide.
- HF -> megatron_lite: logits within 1e-4 of transformers (fp32) at TP 1, and greedy tokens equal to
  transformers' greedy generate at TP 2 x PP 2 (4 gloo ranks);
- megatron_lite -> HF gives every tensor back exactly and the same rope_parameters;
- megatron_lite -> Megatron-LM args carry --use-rope-scaling only with Megatron's fixed band values;
- an unsupported rope type (yarn) is refused naming it.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_lite.config import ConfigError  # noqa: E402
from megatron_lite.testing import run_distributed  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_convert_hf import round_trip  # noqa: E402

VOCAB, PROMPT, NEW_TOKENS = 96, [3, 17, 42, 8, 77, 5, 60, 11], 12
ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}


def make_hf(directory: str, rope: dict = ROPE):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   rope_parameters=dict(rope), tie_word_embeddings=False, initializer_range=0.2,
                                   rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=VOCAB - 1)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    return model.eval()


def _greedy_tp2pp2(directory: str) -> list[int]:
    from megatron_lite import parallel_state as ps
    from megatron_lite.inference import generate, inference_config, load_model
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    return generate(load_model(inference_config(directory, tp=2, pp=2)), PROMPT, NEW_TOKENS)


def test_llama3_rope_scaling(tmp_path):
    hf_dir, ml_dir, back_dir = str(tmp_path / "hf"), str(tmp_path / "ml"), str(tmp_path / "back")
    hf_model = make_hf(hf_dir)
    exported = round_trip(hf_dir, ml_dir, back_dir)
    assert exported["rope_parameters"] == ROPE
    assert transformers.LlamaConfig(**exported).rope_parameters == hf_model.config.rope_parameters

    # Logits at TP 1 (positions well past a few wavelengths of every band).
    from megatron_lite.inference import inference_config, load_model
    model = load_model(inference_config(ml_dir, tp=1, pp=1))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)[..., :VOCAB]
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    # Without the scaling the logits differ: the test sees the feature.
    unscaled = load_model(inference_config(ml_dir, tp=1, pp=1))
    for layer in unscaled.decoder.layers.values():
        layer.self_attention.rope_scaling = None
    with torch.no_grad():
        assert (unscaled(tokens)[..., :VOCAB] - theirs).abs().max() > 1e-3

    # Greedy tokens at TP 2 x PP 2 equal transformers' greedy generate.
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert len(set(expected)) > 2
    for rank_tokens in run_distributed(_greedy_tp2pp2, 4, directory=ml_dir):
        assert rank_tokens == expected

    # Megatron-LM args: only Megatron's fixed band values (1, 4, 8192) are expressible.
    from megatron_lite.checkpoint_io import CheckpointReader
    from megatron_lite.megatron_lm import args_from_config, config_from_args
    config = CheckpointReader(ml_dir).config
    with pytest.raises(ConfigError, match="Megatron's fixed 1, 4 and 8192"):
        args_from_config(config, 1, 1, None, 0, "float32")
    config["model"]["rope_scaling_original_max_position_embeddings"] = 8192
    args = args_from_config(config, 1, 1, None, 0, "float32")
    assert args.use_rope_scaling and args.rope_scaling_factor == 8.0
    m = config_from_args(args).model
    assert m.use_rope_scaling and m.rope_scaling_factor == 8.0 and m.rope_scaling_original_max_position_embeddings == 8192


def test_unsupported_rope_type_is_named(tmp_path):
    from megatron_lite.hf_conversion import config_from_hf
    hf = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 256}).to_dict()
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        config_from_hf(hf)
