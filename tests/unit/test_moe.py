"""MoE router, losses, capacity and experts against hand-computed cases (one process)."""
import math

import pytest
import torch

from megatron_lite.arguments import parse
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.moe.dispatcher import AllGatherDispatcher, AllToAllDispatcher
from megatron_lite.models.moe.experts import GroupedExperts, grouped_mm_works
from megatron_lite.models.moe import finish_moe_step
from megatron_lite.models.moe.moe_layer import MoELayer
from megatron_lite.models.moe.router import (TopKRouter, apply_capacity, switch_load_balancing_loss, topk_routing)
from megatron_lite.process_groups import Group, ProcessGroups

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "64", "--seq-length", "8",
        "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0"]


def moe_config(*flags):
    return parse(BASE + ["--num-experts", "4", "--moe-ffn-hidden-size", "16"] + list(flags), world_size=1)


def test_softmax_topk_after_and_before_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    probs, routing_map = topk_routing(logits, 2)
    e3, e2 = math.exp(3), math.exp(2)
    assert routing_map.tolist() == [[False, True, True, False]]
    assert torch.allclose(probs, torch.tensor([[0.0, e2 / (e2 + e3), e3 / (e2 + e3), 0.0]]))
    probs, _ = topk_routing(logits, 2, pre_softmax=True, scaling_factor=2.0)
    total = sum(math.exp(v) for v in (1, 2, 3, 0))
    assert torch.allclose(probs, torch.tensor([[0.0, 2 * e2 / total, 2 * e3 / total, 0.0]]))


def test_sigmoid_scores_and_expert_bias_steer_the_choice_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    probs, routing_map = topk_routing(logits, 2, score_function="sigmoid", expert_bias=bias)
    s = torch.sigmoid(logits)[0]
    assert routing_map.tolist() == [[True, False, False, True]]  # expert 3 chosen through its bias
    assert torch.allclose(probs[0, [0, 3]], torch.stack([s[0], s[3]]) / (s[0] + s[3]))  # weights: unbiased scores


def test_ties_choose_exactly_k_experts_with_equal_weights():
    probs, routing_map = topk_routing(torch.zeros(3, 4), 2)
    assert routing_map.sum(dim=1).tolist() == [2, 2, 2]
    assert torch.allclose(probs.sum(dim=1), torch.ones(3)) and torch.allclose(probs[routing_map], torch.full((6,), 0.5))


def test_group_limited_routing_picks_the_best_group_first():
    # Groups {0, 1} and {2, 3}: group scores (sum of the top 2 per group) 5 and 8, so group 1 wins although
    # expert 0 has the highest logit.
    _, routing_map = topk_routing(torch.tensor([[5.0, 0.0, 4.0, 4.0]]), 2, num_groups=2, group_topk=1)
    assert routing_map.tolist() == [[False, False, True, True]]


def test_capacity_drop_policies_and_padding():
    # 4 tokens, 2 experts, top-1, capacity ceil(4 * 1 / 2 * 1.0) = 2; every token wants expert 0.
    probs = torch.tensor([[0.6, 0.0], [0.9, 0.0], [0.7, 0.0], [0.9, 0.0]])
    routing_map = probs > 0
    kept_probs, kept = apply_capacity(probs, routing_map, 1, 1.0, "probs")
    assert kept[:, 0].tolist() == [False, True, False, True]  # the two highest (a tie, both kept)
    assert torch.equal(kept_probs[:, 0], torch.tensor([0.0, 0.9, 0.0, 0.9]))
    _, kept = apply_capacity(probs, routing_map, 1, 1.0, "position")
    assert kept[:, 0].tolist() == [True, True, False, False]  # the earliest
    _, kept = apply_capacity(torch.tensor([[0.5, 0.0]] * 4), torch.tensor([[True, False]] * 4), 1, 1.0, "probs")
    assert kept[:, 0].tolist() == [True, True, False, False]  # equal probs: the earlier tokens win
    padded_probs, padded = apply_capacity(probs, routing_map, 1, 1.0, "probs", pad_to_capacity=True)
    assert padded.sum(dim=0).tolist() == [2, 2]  # expert 1 gets 2 zero-weight tokens (an empty expert padded)
    assert float(padded_probs[:, 1].abs().sum()) == 0.0


def test_switch_load_balancing_loss_by_hand():
    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9]])
    counts = torch.tensor([1.0, 2.0])
    # coeff * E / (k T^2) * sum_i counts_i * sum_t p_ti = 0.1 * 2 / (1 * 9) * (1 * 1.35 + 2 * 1.65)
    expected = 0.1 * 2 / 9 * (1.35 + 3.3)
    assert abs(float(switch_load_balancing_loss(scores, counts, 3, 1, 2, 0.1)) - expected) < 1e-7


def test_aux_and_z_loss_join_backward_but_not_the_output():
    cfg = moe_config("--moe-aux-loss-coeff", "0.1", "--moe-z-loss-coeff", "0.01")
    router = TopKRouter(cfg, ProcessGroups.single())
    torch.nn.init.normal_(router.weight, std=0.5)
    tokens = torch.randn(6, 32)
    probs, _ = router(tokens, 3, 2)
    weights = torch.randn(6, 4)
    (probs * weights).sum().backward()
    with_aux = router.weight.grad.clone()
    # Reference: the same loss with the balancing and z losses added explicitly.
    router.weight.grad = None
    logits = tokens @ router.weight.t()
    plain = topk_routing(logits, 2)[0]
    scores = torch.softmax(logits, dim=-1)
    top = torch.zeros_like(scores).scatter(1, scores.topk(2, dim=1)[1], 1)
    balance = switch_load_balancing_loss(scores, top.sum(0), 6, 2, 4, 0.1)
    z = 0.01 * torch.logsumexp(logits, dim=-1).square().mean()
    ((plain * weights).sum() + balance + z).backward()
    assert torch.allclose(with_aux, router.weight.grad, atol=1e-6)
    assert abs(float(router.stats["load_balancing_loss"]) - float(balance.detach()) / 0.1) < 1e-6


def test_expert_bias_update_moves_towards_the_mean_load():
    cfg = moe_config("--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                     "--moe-router-bias-update-rate", "0.01")
    router = TopKRouter(cfg, ProcessGroups.single())
    router.local_tokens_per_expert.copy_(torch.tensor([5.0, 1.0, 2.0, 0.0]))
    router.update_expert_bias()  # mean 2: overloaded experts go down, underloaded up, on-mean stays
    assert torch.allclose(router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    assert float(router.local_tokens_per_expert.sum()) == 0.0


@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_gemm_equals_the_loop_with_an_empty_expert(swiglu):
    flags = ["--swiglu"] if swiglu else []
    loop = GroupedExperts(moe_config(*flags), [0, 1, 2], 1)
    grouped = GroupedExperts(moe_config("--moe-grouped-gemm", *flags), [0, 1, 2], 1)
    for expert in loop.parameters():
        torch.nn.init.normal_(expert, std=0.2)
    grouped.load_state_dict(loop.state_dict())
    tokens = torch.randn(7, 32)
    counts = [3, 0, 4]  # expert 1 receives no tokens
    outs = []
    for experts in (loop, grouped):
        x = tokens.clone().requires_grad_()
        y = experts(x, counts)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad, [p.grad for p in experts.parameters()]))
    assert grouped.use_grouped_gemm() == grouped_mm_works(32, 32 if swiglu else 16, 16, torch.float32, "cpu")
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6) and torch.allclose(outs[0][1], outs[1][1], atol=1e-6)
    for a, b in zip(outs[0][2], outs[1][2]):
        assert torch.allclose(a, b, atol=1e-6)


def _reference_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over the chosen experts of weight x expert(x)."""
    tokens = x.reshape(-1, x.shape[-1])
    probs, routing_map = layer.router(tokens, x.shape[0], x.shape[1])
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for e in routing_map[t].nonzero().flatten().tolist():
            expert = layer.experts.local_experts[str(e)]
            h = torch.nn.functional.gelu(tokens[t] @ expert.linear_fc1.weight.t(), approximate="tanh")
            out[t] += probs[t, e] * (h @ expert.linear_fc2.weight.t())
    return out.view_as(x)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_moe_layer_equals_the_token_by_token_reference(dispatcher):
    cfg = moe_config("--moe-token-dispatcher-type", dispatcher)
    layer = MoELayer(cfg, ProcessGroups.single())
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 2, 32)
    assert torch.allclose(layer(x), _reference_moe(layer, x), atol=1e-5)


def test_dispatchers_handle_a_rank_whose_experts_get_no_tokens():
    group = Group.single("tp_ep")
    cfg = moe_config()
    experts = GroupedExperts(cfg, [0, 1, 2, 3], 1)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    tokens = torch.randn(3, 32)
    routing_map = torch.zeros(3, 4, dtype=torch.bool)
    routing_map[:, 0] = True  # experts 1..3 receive nothing
    probs = routing_map.float()
    a = AllToAllDispatcher(4, 1, 1, group)(tokens, probs, routing_map, experts)
    b = AllGatherDispatcher(4, 1, 1, group)(tokens, probs, routing_map, experts)
    assert torch.allclose(a, b) and a.shape == (3, 32)


def test_gpt_with_moe_layers_logs_pure_lm_loss_and_counts_per_layer():
    cfg = moe_config("--moe-layer-freq", "[0,1]", "--moe-aux-loss-coeff", "0.5", "--moe-shared-expert-intermediate-size",
                     "32", "--moe-shared-expert-gate")
    model = GPTModel(cfg)
    ids = torch.randint(0, 64, (2, 8))
    loss = model(ids, labels=ids).mean()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loss.detach(), model(ids, labels=ids).mean())  # the aux loss is not in the output
    model.train()
    loss.backward()
    layer = model.decoder.layers["1"].mlp
    assert isinstance(layer, MoELayer) and not isinstance(model.decoder.layers["0"].mlp, MoELayer)
    assert float(layer.stats["tokens_per_expert"].sum()) == 16 * 2 and "load_balancing_loss" in layer.stats
    finish_moe_step([model])
