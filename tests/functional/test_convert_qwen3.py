"""Qwen3 dense (per-head q/k RMSNorm before RoPE: --qk-layernorm, Megatron's flag) against transformers,
from a small config (random weights, never downloaded), with head_dim != hidden / heads as Qwen3 has:
- HF -> megatron_lite: logits within 1e-4 of transformers (fp32) at TP 1, and greedy tokens equal to
  transformers' greedy generate at TP 2 x PP 2 (4 gloo ranks; each TP rank normalises its own heads);
- megatron_lite -> HF gives every tensor back exactly, as a Qwen3 config transformers loads;
- megatron_lite -> Megatron-LM torch format -> megatron_lite keeps q/k norms (names
  self_attention.q_layernorm / k_layernorm, as megatron-core's) and every tensor.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_lite.testing import run_distributed  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_convert_hf import _hf_tensors, load_tool, round_trip  # noqa: E402

VOCAB, PROMPT, NEW_TOKENS = 96, [3, 17, 42, 8, 77, 5], 12


def make_hf(directory: str):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
                                   initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=VOCAB - 1)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so a missing or misplaced q/k norm cannot hide
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory)
    return model.eval()


def _greedy_tp2pp2(directory: str) -> list[int]:
    from megatron_lite import parallel_state as ps
    from megatron_lite.inference import generate, inference_config, load_model
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    return generate(load_model(inference_config(directory, tp=2, pp=2)), PROMPT, NEW_TOKENS)


def test_qwen3(tmp_path):
    hf_dir, ml_dir, back_dir = str(tmp_path / "hf"), str(tmp_path / "ml"), str(tmp_path / "back")
    hf_model = make_hf(hf_dir)
    exported = round_trip(hf_dir, ml_dir, back_dir)
    assert any("q_norm" in n for n in _hf_tensors(back_dir))
    assert exported["model_type"] == "qwen3" and exported["architectures"] == ["Qwen3ForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back_dir)
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"

    from megatron_lite.inference import inference_config, load_model
    model = load_model(inference_config(ml_dir, tp=1, pp=1))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[..., :VOCAB], hf_model(tokens).logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(reloaded(tokens).logits, hf_model(tokens).logits, rtol=0, atol=0)
        expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert len(set(expected)) > 2
    for rank_tokens in run_distributed(_greedy_tp2pp2, 4, directory=ml_dir):
        assert rank_tokens == expected

    # Megatron-LM torch format keeps the q/k norms under megatron-core's names.
    mlm_dir, again = str(tmp_path / "mlm"), str(tmp_path / "again")
    convert = load_tool("convert")
    assert convert.main(["--loader", "megatron_lite", "--saver", "megatron", "--load-dir", ml_dir, "--save-dir", mlm_dir,
                         "--target-tensor-parallel-size", "2"]) == 0
    blob = torch.load(os.path.join(mlm_dir, "iter_0000000", "mp_rank_01", "model_optim_rng.pt"), weights_only=False)
    assert blob["args"].qk_layernorm and "decoder.layers.3.self_attention.k_layernorm.weight" in blob["model"]
    assert convert.main(["--loader", "megatron", "--saver", "megatron_lite", "--load-dir", mlm_dir, "--save-dir", again,
                         "--true-vocab-size", str(VOCAB)]) == 0
    from megatron_lite.checkpoint_io import CheckpointReader
    first, second = CheckpointReader(ml_dir), CheckpointReader(again)
    assert first.param_names() == second.param_names()
    for name in first.param_names():
        assert torch.equal(first.full_tensor(name), second.full_tensor(name)), name
