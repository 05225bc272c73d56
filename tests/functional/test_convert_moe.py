"""MoE conversion against transformers, from small configs (random weights, never downloaded): Mixtral,
Qwen2-MoE (shared expert with its sigmoid gate, q/k/v biases, a dense first layer, top-k weights not
renormalised) and Qwen3-MoE (q/k norms):
- HF -> megatron_lite (written for TP 2, EP 2): logits within 1e-4 of transformers (fp32) at TP 1;
- megatron_lite -> HF gives every tensor back exactly, as a config transformers loads to the same class;
- greedy tokens equal transformers' greedy generate at TP 2 x EP 2 (4 gloo ranks; for Mixtral also through
  tools/generate.py, which takes TP 2 x EP 2 from the checkpoint).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from megatron_lite.testing import run_distributed  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_convert_hf import load_tool  # noqa: E402

VOCAB, PROMPT, NEW_TOKENS = 96, [3, 17, 42, 8, 77, 5], 10
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False,
              num_experts_per_tok=2, bos_token_id=0, eos_token_id=VOCAB - 1)
FAMILIES = {
    "MixtralForCausalLM": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                                   shared_expert_intermediate_size=40, mlp_only_layers=[0],
                                                   norm_topk_prob=False)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                                   head_dim=16, norm_topk_prob=True)),
}


def make_hf(directory: str, arch: str):
    torch.manual_seed(0)
    config_cls, extra = FAMILIES[arch]
    model = getattr(transformers, arch)(getattr(transformers, config_cls)(**COMMON, **extra))
    with torch.no_grad():  # non-trivial norms and biases, so nothing misplaced can hide
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory)
    return model.eval()


def _greedy_tp2ep2(directory: str) -> list[int]:
    from megatron_lite import parallel_state as ps
    from megatron_lite.inference import generate, inference_config, load_model
    ps.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=2)
    return generate(load_model(inference_config(directory, tp=2, ep=2)), PROMPT, NEW_TOKENS)


def _generate_cli(directory: str) -> list[int]:
    """tools/generate.py on 4 ranks with no layout flags: the checkpoint's TP 2 x EP 2 (written by convert.py)."""
    generate = _load_generate()
    [result] = generate.main(["--load", directory, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                              str(NEW_TOKENS), "--greedy", "--ignore-eod"])
    return result["generated_ids"]


def _load_generate():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "generate.py")
    spec = importlib.util.spec_from_file_location("generate_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_moe_conversion(tmp_path, arch):
    hf_dir, ml_dir, back_dir = str(tmp_path / "hf"), str(tmp_path / "ml"), str(tmp_path / "back")
    hf_model = make_hf(hf_dir, arch)
    convert = load_tool("convert")
    assert convert.main(["--loader", "hf", "--saver", "megatron_lite", "--load-dir", hf_dir, "--save-dir", ml_dir,
                         "--target-tensor-parallel-size", "2", "--target-expert-model-parallel-size", "2"]) == 0
    assert convert.main(["--loader", "megatron_lite", "--saver", "hf", "--load-dir", ml_dir, "--save-dir", back_dir]) == 0
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    back = {}
    for name in os.listdir(back_dir):
        if name.endswith(".safetensors"):
            back.update(load_file(os.path.join(back_dir, name)))
    assert set(back) == set(original) and any(".experts.3." in n for n in back)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    with open(os.path.join(back_dir, "config.json")) as handle:
        assert json.load(handle)["architectures"] == [arch]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back_dir)
    assert type(reloaded).__name__ == arch

    from megatron_lite.inference import inference_config, load_model
    model = load_model(inference_config(ml_dir, tp=1, pp=1))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = hf_model(tokens).logits
        torch.testing.assert_close(model(tokens)[..., :VOCAB], expected_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(reloaded(tokens).logits, expected_logits, rtol=0, atol=0)
        expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert len(set(expected)) > 2
    for rank_tokens in run_distributed(_greedy_tp2ep2, 4, directory=ml_dir):
        assert rank_tokens == expected
    if arch == "MixtralForCausalLM":  # the command-line tool, its layout taken from the checkpoint
        for rank_tokens in run_distributed(_generate_cli, 4, directory=ml_dir):
            assert rank_tokens == expected
