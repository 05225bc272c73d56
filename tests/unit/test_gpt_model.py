"""GPTModel as pipeline chunks (global layer names, tied copies) and activation recomputation (single process)."""
from __future__ import annotations

import pytest
import torch

from megatron_lite.config import Config, ConfigError
from megatron_lite.models.gpt import GPTModel
from megatron_lite.tensor_parallel import model_parallel_seed


def _config(num_layers: int = 4, dropout: float = 0.0, **overrides) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = num_layers, 32, 4, 16, 100
    m.hidden_dropout = m.attention_dropout = dropout
    m.make_vocab_size_divisible_by = 8
    for key, value in overrides.items():
        setattr(m, key, value)
    return cfg.validate()


def _batch(vocab: int = 100):
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(3))
    return ids[:, :-1], ids[:, 1:]


def test_parameter_names_are_global_and_metadata_complete():
    model = GPTModel(_config(), pre_process=False, post_process=False, layer_numbers=[2, 3])
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("decoder.layers.2.", "decoder.layers.3.")) for n in names), names
    assert [layer.layer_number for layer in model.decoder.layers.values()] == [2, 3]
    for param in model.parameters():
        for attr in ("shard_spec", "sequence_parallel", "shared_embedding"):
            assert hasattr(param, attr), attr
    qkv = model.decoder.layers["2"].self_attention.linear_qkv.weight
    assert (qkv.shard_spec.is_sharded, qkv.shard_spec.partition_dim) == (True, 0)
    proj = model.decoder.layers["2"].self_attention.linear_proj.weight
    assert (proj.shard_spec.is_sharded, proj.shard_spec.partition_dim) == (True, 1)


@pytest.mark.parametrize("untie", [False, True])
def test_two_stage_split_equals_full_model(untie):
    cfg = _config(untie_embeddings_and_output_weights=untie)
    full = GPTModel(cfg)
    first = GPTModel(cfg, pre_process=True, post_process=False, layer_numbers=[0, 1])
    last = GPTModel(cfg, pre_process=False, post_process=True, layer_numbers=[2, 3])
    full_params = dict(full.named_parameters())
    assert ("output_layer.weight" in full_params) == untie  # PP=1 tied: the embedding is the output weight
    for stage in (first, last):  # same seed, same name -> same weights, whatever the split
        for name, param in stage.named_parameters():
            source = "embedding.word_embeddings.weight" if (name == "output_layer.weight" and not untie) else name
            assert torch.equal(param, full_params[source]), name
    emb, out = first.embedding.word_embeddings.weight, last.output_layer.weight
    assert emb.shared_embedding == out.shared_embedding == (not untie)
    assert not any(p.shared_embedding for p in full.parameters())

    ids, labels = _batch()
    loss_full = full(ids, labels=labels)
    hidden = first(ids)
    assert hidden.shape == (16, 2, 32)  # [s, b, h]
    stage_input = hidden.detach().requires_grad_()
    last.set_input_tensor(stage_input)
    loss_split = last(None, labels=labels)
    torch.testing.assert_close(loss_split, loss_full, rtol=0, atol=0)
    loss_full.mean().backward()
    loss_split.mean().backward()
    hidden.backward(stage_input.grad)
    for name, param in list(first.named_parameters()) + list(last.named_parameters()):
        expected = full_params["embedding.word_embeddings.weight" if name == "output_layer.weight" and not untie else name].grad
        if name.startswith(("embedding.word_embeddings", "output_layer")) and not untie:
            # tied: the full model's grad is the sum of both stages' grads (what the embedding group all-reduces)
            grad = first.embedding.word_embeddings.weight.grad + last.output_layer.weight.grad
        else:
            grad = param.grad
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7, msg=name)


RECOMPUTE = [dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
             dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
             dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
             dict(recompute_granularity="selective")]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_recompute_gives_identical_grads_with_dropout(style):
    extra = dict(position_embedding_type="rope", swiglu=True, normalization="RMSNorm", ffn_hidden_size=64,
                 untie_embeddings_and_output_weights=True) if style == "llama" else {}

    def grads(**recompute):
        model = GPTModel(_config(dropout=0.2, **extra, **recompute)).train()
        model_parallel_seed(99)
        ids, labels = _batch()
        loss = model(ids, labels=labels)
        loss.mean().backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    ref_loss, ref = grads()
    for recompute in RECOMPUTE:
        loss, result = grads(**recompute)
        assert torch.equal(loss, ref_loss), recompute
        for name in ref:
            assert torch.equal(result[name], ref[name]), (recompute, name)


def test_missing_vocab_size_is_a_config_error():
    cfg = _config()
    cfg.model.vocab_size = None
    with pytest.raises(ConfigError, match="--vocab-size"):
        GPTModel(cfg)


def test_groups_that_contradict_the_config_are_refused():
    from megatron_lite.config import ConfigError
    from megatron_lite.distributed.ddp import DistributedDataParallel
    cfg = _config()
    cfg.parallel.tensor_model_parallel_size, cfg.world_size = 2, 2
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size: the config says 2 but the process groups"):
        GPTModel(cfg)  # default groups: one process
    cfg = _config()
    cfg.world_size = 2  # DP = 2 in the config, one-process groups given
    with pytest.raises(ConfigError, match="DP x CP = 2"):
        DistributedDataParallel(cfg, GPTModel(cfg))
