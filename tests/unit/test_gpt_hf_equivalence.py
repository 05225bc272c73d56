"""Our GPT math equals Hugging Face GPT-2 and Llama: weights copied across give the same logits.

This pins the conventions a checkpoint converter relies on: GeLU tanh ("gelu_new"), LayerNorm/RMSNorm
epsilon, Megatron's group-interleaved QKV, SwiGLU's [gate; up] fc1, RoPE's rotate_half convention,
GQA's head-to-group mapping, tied/untied output. Tolerance (fp32): atol 1e-5, rtol 1e-5.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_lite.config import Config  # noqa: E402
from megatron_lite.models.gpt import GPTModel  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _config(style: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.seq_length, m.vocab_size = 2, 32, 16, 100
    m.hidden_dropout = m.attention_dropout = 0.0
    m.init_method_std = 0.2  # large weights, so a convention mismatch cannot hide under tiny activations
    if style == "llama":
        m.num_attention_heads, m.group_query_attention, m.num_query_groups = 8, True, 2
        m.position_embedding_type, m.swiglu, m.normalization = "rope", True, "RMSNorm"
        m.add_bias_linear, m.untie_embeddings_and_output_weights, m.ffn_hidden_size = False, True, 48
        m.rotary_base, m.norm_epsilon = 500000.0, 1e-6
    else:
        m.num_attention_heads = 4
    return cfg.validate()


def _split_qkv(weight: torch.Tensor, m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's [groups, heads_per_group + 2, head_dim, ...] QKV into HF's q, k, v."""
    hpg = m.num_attention_heads // m.num_query_groups
    w = weight.view(m.num_query_groups, hpg + 2, m.head_dim, *weight.shape[1:])
    q = w[:, :hpg].reshape(m.num_attention_heads * m.head_dim, *weight.shape[1:])
    k = w[:, hpg].reshape(m.num_query_groups * m.head_dim, *weight.shape[1:])
    v = w[:, hpg + 1].reshape(m.num_query_groups * m.head_dim, *weight.shape[1:])
    return q, k, v


def _to_gpt2(model: GPTModel, m):
    hf_cfg = transformers.GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_position_embeddings, n_embd=m.hidden_size,
                                     n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=m.ffn_hidden_size,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     layer_norm_epsilon=m.norm_epsilon, tie_word_embeddings=True,
                                     bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    sd = {"transformer.wte.weight": ours["embedding.word_embeddings.weight"][:m.vocab_size],
          "transformer.wpe.weight": ours["embedding.position_embeddings.weight"],
          "transformer.ln_f.weight": ours["decoder.final_layernorm.weight"],
          "transformer.ln_f.bias": ours["decoder.final_layernorm.bias"]}
    for i in range(m.num_layers):
        p, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        qkv_w = torch.cat(_split_qkv(ours[p + "self_attention.linear_qkv.weight"], m))
        qkv_b = torch.cat(_split_qkv(ours[p + "self_attention.linear_qkv.bias"], m))
        sd.update({h + "ln_1.weight": ours[p + "input_layernorm.weight"], h + "ln_1.bias": ours[p + "input_layernorm.bias"],
                   h + "ln_2.weight": ours[p + "pre_mlp_layernorm.weight"], h + "ln_2.bias": ours[p + "pre_mlp_layernorm.bias"],
                   h + "attn.c_attn.weight": qkv_w.t(), h + "attn.c_attn.bias": qkv_b,  # Conv1D stores [in, out]
                   h + "attn.c_proj.weight": ours[p + "self_attention.linear_proj.weight"].t(),
                   h + "attn.c_proj.bias": ours[p + "self_attention.linear_proj.bias"],
                   h + "mlp.c_fc.weight": ours[p + "mlp.linear_fc1.weight"].t(), h + "mlp.c_fc.bias": ours[p + "mlp.linear_fc1.bias"],
                   h + "mlp.c_proj.weight": ours[p + "mlp.linear_fc2.weight"].t(), h + "mlp.c_proj.bias": ours[p + "mlp.linear_fc2.bias"]})
    missing, _ = hf.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing
    hf.tie_weights()
    return hf


def _to_llama(model: GPTModel, m):
    hf_cfg = transformers.LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                                      num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                                      num_key_value_heads=m.num_query_groups, max_position_embeddings=m.seq_length,
                                      rms_norm_eps=m.norm_epsilon, rope_theta=m.rotary_base, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False)
    if getattr(hf_cfg, "rope_parameters", None) is not None:  # newer transformers keep theta here
        hf_cfg.rope_parameters["rope_theta"] = m.rotary_base
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    sd = {"model.embed_tokens.weight": ours["embedding.word_embeddings.weight"][:m.vocab_size],
          "model.norm.weight": ours["decoder.final_layernorm.weight"],
          "lm_head.weight": ours["output_layer.weight"][:m.vocab_size]}
    for i in range(m.num_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(ours[p + "self_attention.linear_qkv.weight"], m)
        gate, up = ours[p + "mlp.linear_fc1.weight"].chunk(2)
        sd.update({h + "input_layernorm.weight": ours[p + "input_layernorm.weight"],
                   h + "post_attention_layernorm.weight": ours[p + "pre_mlp_layernorm.weight"],
                   h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                   h + "self_attn.o_proj.weight": ours[p + "self_attention.linear_proj.weight"],
                   h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                   h + "mlp.down_proj.weight": ours[p + "mlp.linear_fc2.weight"]})
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_logits_equal_hugging_face(style):
    cfg = _config(style)
    m = cfg.model
    model = GPTModel(cfg).eval()
    for name, param in model.named_parameters():  # non-trivial norms and biases too
        if name.endswith(("layernorm.weight", "layernorm.bias", ".bias")):
            with torch.no_grad():
                param.add_(torch.randn_like(param) * 0.1)
    hf = _to_gpt2(model, m) if style == "gpt2" else _to_llama(model, m)
    ids = torch.randint(0, m.vocab_size, (2, m.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)[..., :m.vocab_size]
        theirs = hf(ids).logits
        torch.testing.assert_close(ours, theirs, **TOL)
        # Per-token loss equals HF's cross entropy on the same logits.
        labels = torch.roll(ids, -1, dims=1)
        loss = model(ids, labels=labels)
        ref = torch.nn.functional.cross_entropy(theirs.reshape(-1, m.vocab_size), labels.reshape(-1), reduction="none")
        torch.testing.assert_close(loss, ref.view_as(loss), **TOL)


def test_reset_position_ids_and_attention_mask_match_hugging_face_llama():
    """Packed documents: positions restart and attention stops at each document boundary."""
    from megatron_lite.data.gpt_dataset import get_ltor_masks_and_position_ids
    cfg = _config("llama")
    m = cfg.model
    model = GPTModel(cfg).eval()
    hf = _to_llama(model, m)
    ids = torch.randint(1, m.vocab_size, (1, m.seq_length), generator=torch.Generator().manual_seed(1))
    ids[0, 6] = 0  # eod: a document boundary after position 6
    _, position_ids, mask = get_ltor_masks_and_position_ids(ids[0].numpy(), 0, True, True, False)
    position_ids, mask = torch.from_numpy(position_ids)[None], torch.from_numpy(mask)[None]
    with torch.no_grad():
        ours = model(ids, position_ids=position_ids, attention_mask=mask)[..., :m.vocab_size]
        first = hf(ids[:, :7]).logits  # each document alone
        second = hf(ids[:, 7:]).logits
    torch.testing.assert_close(ours, torch.cat([first, second], dim=1), **TOL)
