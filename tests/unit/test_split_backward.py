"""Split backward (--delay-wgrad-compute semantics, used by the zero-bubble schedules): a linear layer with
a weight-gradient queue computes only input (and bias) gradients in backward (B) and queues its weight
gradient for a later W (the transformer layers' linears; the output layer's GEMM fused with the loss is
not split). B then W gives bitwise the gradients of the plain backward, for the TP layers
alone and for a whole GPTModel (untied llama style and tied GPT style), over accumulated micro-batches;
the runner drives B and W through ZB-H1's action list in one process."""
from __future__ import annotations

import pytest
import torch

from megatron_lite.config import Config
from megatron_lite.models.gpt import GPTModel
from megatron_lite.pipeline.runner import forward_backward
from megatron_lite.pipeline.actions import Backward, WeightGrad
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _linears(module: torch.nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def _config(style: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = 2, 32, 4, 16, 100
    m.hidden_dropout = m.attention_dropout = 0.0
    m.make_vocab_size_divisible_by = 8
    if style == "llama":
        m.position_embedding_type, m.swiglu, m.normalization = "rope", True, "RMSNorm"
        m.add_bias_linear, m.untie_embeddings_and_output_weights, m.ffn_hidden_size = False, True, 64
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 6
    return cfg.validate()


def _microbatches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, 100, (count, 2, 17), generator=torch.Generator().manual_seed(5))
    return [(ids[i, :, :-1], ids[i, :, 1:]) for i in range(count)]


def test_linear_layers_defer_only_the_weight_gradient_bitwise():
    def run(split: bool):
        torch.manual_seed(0)
        column, row = ColumnParallelLinear(8, 16), RowParallelLinear(16, 8)
        for param in [*column.parameters(), *row.parameters()]:
            param.data.normal_()
        queue: list = []
        if split:
            column.wgrad_queue = row.wgrad_queue = queue
        fired = []  # DDP marks a parameter ready from this hook: it must not fire for a deferred weight in B
        for param in (column.weight, row.weight):
            param.register_post_accumulate_grad_hook(lambda p: fired.append(p))
        input_grads = []
        for _ in range(2):
            x = torch.randn(5, 3, 8, requires_grad=True)
            row(torch.tanh(column(x))).pow(2).sum().backward()
            input_grads.append(x.grad)
        if split:
            assert column.weight.grad is None and row.weight.grad is None  # deferred...
            assert column.bias.grad is not None and row.bias.grad is not None  # ...biases are not
            assert len(queue) == 4 and fired == []
            for compute in queue:
                compute()
            assert len(fired) == 4
        return input_grads, [p.grad for p in [*column.parameters(), *row.parameters()]]

    plain, split = run(False), run(True)
    for a, b in zip(plain[0] + plain[1], split[0] + split[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_gpt_model_b_then_w_equals_plain_backward_bitwise(style):
    cfg = _config(style)
    reference, split = GPTModel(cfg), GPTModel(cfg)
    split.load_state_dict(reference.state_dict())
    queue: list = []
    for layer in _linears(split):
        layer.wgrad_queue = queue
    for tokens, labels in _microbatches(3):
        reference(tokens, None, None, labels).mean().backward()
        split(tokens, None, None, labels).mean().backward()
    # the transformer layers' linears defer; the output layer's GEMM is fused with the loss (not deferred)
    deferred = {id(layer.weight) for layer in _linears(split.decoder)}
    assert deferred and all(p.grad is None for p in split.parameters() if id(p) in deferred)
    for compute in queue:
        compute()
    for (name, p), q in zip(reference.named_parameters(), split.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_runner_drives_zb_h1_b_and_w_actions():
    # PP = 1 process, but ZB-H1's rank-0 list of a PP = 1 "pipeline" is not allowed; run rank 0's actions of a
    # one-stage list built the same way: Backward(defer_wgrad) then WeightGrad per micro-batch.
    cfg = _config("gpt")
    reference, split = GPTModel(cfg), GPTModel(cfg)
    split.load_state_dict(reference.state_dict())
    batches = _microbatches(3)
    for tokens, labels in batches:
        (reference(tokens, None, None, labels).mean() / 3).backward()

    def step(data_iterator, model):
        tokens, labels = next(data_iterator)
        return model(tokens, None, None, labels), lambda out: (out.mean(), {"lm loss": out.mean().detach()})

    stats: dict = {}
    import megatron_lite.pipeline.runner as runner
    original = runner.build_schedule

    def zb_like(name, *args, **kwargs):
        actions = original(name, *args, **kwargs)
        out = []
        for action in actions:
            if isinstance(action, Backward):
                out += [Backward(action.chunk, action.microbatch, action.sync_grads, defer_wgrad=True),
                        WeightGrad(action.chunk, action.microbatch, action.sync_grads)]
            else:
                out.append(action)
        return out

    runner.build_schedule = zb_like
    try:
        forward_backward(schedule="no_pipelining", forward_step_func=step, data_iterator=iter(batches), model=split,
                         num_microbatches=3, seq_length=16, micro_batch_size=2, config=cfg, stats=stats)
    finally:
        runner.build_schedule = original
    assert all(layer.wgrad_queue is None for layer in _linears(split))  # the runner cleans up
    assert stats["max_in_flight"] == 1
    for (name, p), q in zip(reference.named_parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    assert any(isinstance(a, WeightGrad) for a in build_schedule("zb-h1", 2, 0, 1, 3))
