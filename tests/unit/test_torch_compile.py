"""--torch-compile: each transformer layer is compiled in place. The fast test checks the wiring (parameter
names and state_dict keys unchanged, every layer marked compiled); the slow one runs the compiled model on
CPU and compares losses and every gradient with eager mode."""
from __future__ import annotations

import pytest
import torch

from megatron_lite.config import Config
from megatron_lite.models.gpt.model import GPTModel


def _config(torch_compile: bool, **model: object) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = 1, 32, 4, 8, 64
    m.hidden_dropout = m.attention_dropout = 0.0
    m.torch_compile = torch_compile
    for key, value in model.items():
        setattr(m, key, value)
    return cfg.validate()


def test_compile_flag_compiles_layers_in_place() -> None:
    eager, compiled = GPTModel(_config(False)), GPTModel(_config(True))
    assert list(eager.state_dict()) == list(compiled.state_dict())  # checkpoints do not change
    for layer in compiled.decoder.layers.values():
        assert layer._compiled_call_impl is not None  # nn.Module.compile: compiled on first call
    for layer in eager.decoder.layers.values():
        assert layer._compiled_call_impl is None


# ~15 s per style on a busy 2-core CPU (compiling forward and backward): GPT-2 style by default, Llama slow.
@pytest.mark.parametrize("style", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_compiled_layer_matches_eager_on_cpu(style: str) -> None:
    extra = {} if style == "gpt2" else dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                                             add_bias_linear=False, group_query_attention=True, num_query_groups=2)
    torch._dynamo.reset()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for flag in (False, True):
        model = GPTModel(_config(flag, **extra))
        loss = model(tokens, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really was compiled
    torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-5, rtol=1e-5)
    for name, grad in grads_eager.items():
        # fp32: Inductor fuses and reorders float ops, nothing else (measured: largest gradient difference
        # 6e-8 absolute for GPT-2 style, 4.5e-8 for Llama style, |grad| <= 0.42), so the suite's fp32 rule.
        torch.testing.assert_close(grads_compiled[name], grad, atol=1e-6, rtol=1e-5, msg=name)
