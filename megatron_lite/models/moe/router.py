"""The MoE router: scores, top-k (optionally group-limited), expert bias, capacity, load-balancing losses.

Semantics are megatron-core's (moe_utils.py / router.py):
- softmax scores: top-k of the logits, then softmax over the k chosen (--moe-router-pre-softmax: softmax over
  all experts first); sigmoid scores: top-k of sigmoid(logits) (+ expert bias for the choice only), the
  chosen scores renormalised to sum 1 when k > 1; --moe-router-topk-scaling-factor multiplies the weights.
- load-balancing loss (Switch): coeff * E / (k * T^2) * sum_i (tokens_i * sum_t p_ti), with tokens counted over
  the whole sequence (the TP x CP ranks that hold parts of it), so each rank's loss is its share of the
  sequence's loss; seq_aux_loss does that per sequence and averages over the batch; global_aux_loss counts
  tokens over TP x DP x CP and keeps a running mean over the step's micro-batches.
- z-loss: coeff * mean_t logsumexp(logits_t)^2, coefficient divided by TP x CP (each rank's share).
Losses enter backward through AuxLossScaler attached to the routing weights (megatron-core's
MoEAuxLossAutoScaler), so the language-model loss that is logged stays the pure LM loss. The gradient
they receive is `aux_loss_scale` (set per step by the pipeline runner to what the LM loss of one
micro-batch receives: loss scale x CP / micro-batches).
- capacity (--moe-expert-capacity-factor): ceil(T * k / E * factor) pairs per expert, decided over this
  rank's tokens before dispatch (so it depends on how tokens are split over ranks, as in Megatron).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from megatron_lite import collectives
from megatron_lite.config import Config
from megatron_lite.process_groups import Group, ProcessGroups
from megatron_lite.tensor_parallel.random import is_recomputing
from megatron_lite.tensor_parallel.utils import set_init


class AuxLossScaler(torch.autograd.Function):
    """Identity on `output`; in backward, gives `aux_loss` the gradient `scale` (so it joins the loss)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss, scale)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        aux_loss, scale = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * scale.to(aux_loss.device, aux_loss.dtype), None


def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k restricted to the `group_topk` expert groups whose best topk/group_topk scores sum highest."""
    tokens, experts = scores.shape
    group_scores = scores.view(tokens, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(tokens, num_groups, experts // num_groups).reshape(tokens, -1)
    return torch.topk(scores.masked_fill(~score_mask.bool(), float("-inf")), k=topk, dim=-1)


def topk_routing(logits: torch.Tensor, topk: int, score_function: str = "softmax", pre_softmax: bool = False,
                 num_groups: Optional[int] = None, group_topk: Optional[int] = None,
                 scaling_factor: Optional[float] = None,
                 expert_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing probs [T, E] (zero where not chosen), routing map [T, E] bool) from router logits [T, E]."""
    def choose(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if group_topk:
            return group_limited_topk(scores, topk, num_groups, group_topk)
        return torch.topk(scores, k=topk, dim=1)

    if score_function == "softmax":
        if pre_softmax:
            probs, top_indices = choose(torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits))
        else:
            scores, top_indices = choose(logits)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is not None:  # the bias steers the choice only; weights are the unbiased scores
            _, top_indices = choose(scores + expert_bias)
            scores = torch.gather(scores, dim=1, index=top_indices)
        else:
            scores, top_indices = choose(scores)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    else:
        raise ValueError(f"unknown score function {score_function!r}")
    if scaling_factor:
        probs = probs * scaling_factor
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def apply_capacity(probs: torch.Tensor, routing_map: torch.Tensor, topk: int, capacity_factor: float,
                   drop_policy: str = "probs", pad_to_capacity: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's apply_router_token_dropping: each expert keeps at most `capacity` pairs (its highest
    probs, or its earliest tokens); with pad_to_capacity every expert gets exactly `capacity` tokens (the
    extra ones with weight 0). Ties in probs go to the earlier token (a stable order, unlike torch.topk)."""
    num_tokens, num_experts = probs.shape
    capacity = expert_capacity(num_tokens, num_experts, topk, capacity_factor)
    if capacity >= num_tokens:
        keep = torch.ones_like(routing_map)
    else:
        key = probs.detach() if drop_policy == "probs" else routing_map.to(probs.dtype)
        # Stable descending sort: among equal keys the earlier token wins, on every layout alike.
        order = torch.sort(key, dim=0, descending=True, stable=True)[1][:capacity]
        keep = torch.zeros_like(routing_map).scatter(0, order, True)
    final_map = keep if pad_to_capacity else routing_map & keep
    return probs * final_map, final_map


def switch_load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, total_tokens: float,
                               topk: int, num_experts: int, coeff: float) -> torch.Tensor:
    """coeff * E / (k * T^2) * sum_i tokens_i * sum_t probs_ti (megatron-core's switch_load_balancing_loss_func)."""
    return torch.sum(probs.sum(dim=0) * tokens_per_expert) * (num_experts * coeff / (topk * total_tokens * total_tokens))


def aux_loss_scores(logits: torch.Tensor, topk: int, score_function: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing map of plain top-k, normalised scores over all experts) that the balancing losses use."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits.float())
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    top_indices = torch.topk(scores, k=topk, dim=1)[1]
    return torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool(), scores


def _summed(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    out = tensor.detach().float().clone()
    collectives.all_reduce(out, group)
    return out


class TopKRouter(nn.Module):
    """Router weight [E, h] (replicated; each rank routes its own tokens, so its grads are summed over TP
    like sequence-parallel parameters) and, with --moe-router-enable-expert-bias, the expert bias (fp32,
    not trained by the optimizer: updated from the step's token counts, see update_expert_bias)."""

    def __init__(self, config: Config, groups: ProcessGroups, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.moe, self.hidden = config.moe, config.model.hidden_size
        self.num_experts, self.topk = config.moe.num_experts, config.moe.moe_router_topk
        self.tp_cp, self.tp_dp_cp = groups.tp_cp, groups.tp_dp_cp
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden, dtype=config.params_dtype, device=device))
        set_init(self.weight, "normal", config.model.init_method_std)
        self.weight.sequence_parallel = True
        self.expert_bias = None
        if config.moe.moe_router_enable_expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(self.num_experts, dtype=torch.float32, device=device),
                                            requires_grad=False)
            set_init(self.expert_bias, "zeros")
            self.register_buffer("local_tokens_per_expert", torch.zeros(self.num_experts, device=device), persistent=False)
        self.register_buffer("global_tokens_per_expert", torch.zeros(self.num_experts, device=device), persistent=False)
        self.global_steps = 0  # micro-batches in global_tokens_per_expert (reset by the training step)
        self.aux_loss_scale = torch.ones((), device="cpu")  # a host scalar even in a model built on meta
        self.stats: dict[str, torch.Tensor] = {}  # the last forward's losses (divided by their coefficients)

    def forward(self, tokens: torch.Tensor, seq_length: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [T, h] (T = seq_length x batch, sequence-major) -> (probs [T, E], routing map [T, E])."""
        m = self.moe
        logits = torch.matmul(tokens, self.weight.t()).float()  # [T, E], routing in fp32
        record = self.training and not is_recomputing()
        logits = self._z_loss(logits, record)
        probs, routing_map = topk_routing(logits, self.topk, m.moe_router_score_function, m.moe_router_pre_softmax,
                                          m.moe_router_num_groups, m.moe_router_group_topk,
                                          m.moe_router_topk_scaling_factor, self.expert_bias)
        if m.moe_expert_capacity_factor is not None:
            routed = routing_map
            probs, routing_map = apply_capacity(probs, routing_map, self.topk, m.moe_expert_capacity_factor,
                                                m.moe_token_drop_policy, m.moe_pad_expert_input_to_capacity)
            if record:
                self.stats["tokens_dropped"] = (routed & ~routing_map).sum().float()
        if self.training and torch.is_grad_enabled() and m.moe_router_load_balancing_type != "none" \
                and m.moe_aux_loss_coeff > 0:
            probs = self._load_balancing_loss(logits, probs, seq_length, batch, record)
        if self.expert_bias is not None and record and torch.is_grad_enabled():
            self.local_tokens_per_expert += routing_map.sum(dim=0)
        return probs, routing_map

    def _z_loss(self, logits: torch.Tensor, record: bool) -> torch.Tensor:
        coeff = self.moe.moe_z_loss_coeff
        if coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        z = torch.mean(torch.square(torch.logsumexp(logits, dim=-1))) * (coeff / self.tp_cp.size)
        if record:
            self.stats["z_loss"] = z.detach() / coeff
        return AuxLossScaler.apply(logits, z, self.aux_loss_scale)

    def _load_balancing_loss(self, logits: torch.Tensor, probs: torch.Tensor, seq_length: int, batch: int,
                             record: bool) -> torch.Tensor:
        kind, coeff, E, k = self.moe.moe_router_load_balancing_type, self.moe.moe_aux_loss_coeff, self.num_experts, self.topk
        routing_map, scores = aux_loss_scores(logits, k, self.moe.moe_router_score_function)
        if kind == "aux_loss":
            counts = _summed(routing_map.sum(dim=0), self.tp_cp)
            loss = switch_load_balancing_loss(scores, counts, logits.shape[0] * self.tp_cp.size, k, E, coeff)
        elif kind == "seq_aux_loss":  # tokens are sequence-major: [s, b * E] groups each sequence's experts
            counts = _summed(routing_map.reshape(seq_length, -1).sum(dim=0), self.tp_cp)
            loss = switch_load_balancing_loss(scores.reshape(seq_length, -1), counts, seq_length * self.tp_cp.size,
                                              k, E, coeff) / batch
        else:  # global_aux_loss: counts over the data-parallel batch, averaged over the step's micro-batches
            counts = _summed(routing_map.sum(dim=0), self.tp_dp_cp)
            if not is_recomputing():
                self.global_tokens_per_expert += counts
                self.global_steps += 1
            mean_counts = self.global_tokens_per_expert / max(1, self.global_steps)
            loss = switch_load_balancing_loss(scores, mean_counts, logits.shape[0] * self.tp_dp_cp.size, k, E, coeff)
        if record:
            self.stats["load_balancing_loss"] = loss.detach() / coeff
        return AuxLossScaler.apply(probs, loss, self.aux_loss_scale)

    def reset_step(self) -> None:
        """Start of a training step: the global aux loss's running counts start again."""
        self.global_tokens_per_expert.zero_()
        self.global_steps = 0

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After a step's backward (on every rank of TP x DP x CP together): bias += rate * sign(mean load -
        load), from the step's token counts summed over TP x DP x CP (megatron-core's get_updated_expert_bias)."""
        if self.expert_bias is None:
            return
        counts = _summed(self.local_tokens_per_expert, self.tp_dp_cp)
        offset = counts.mean() - counts
        self.expert_bias.add_(torch.sign(offset) * self.moe.moe_router_bias_update_rate)
        self.local_tokens_per_expert.zero_()
