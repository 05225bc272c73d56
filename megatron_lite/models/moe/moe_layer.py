"""The MoE layer that replaces a transformer layer's MLP: router -> dispatcher -> experts -> combine, plus an
optional shared expert (with Qwen2-MoE's sigmoid gate). `build_mlp` picks the dense MLP or this per layer
(--moe-layer-freq).

Parameter names (megatron-core's, expert indices global):
  mlp.router.weight [E, h], mlp.router.expert_bias [E] (--moe-router-enable-expert-bias)
  mlp.experts.local_experts.{e}.linear_fc1.weight, ...linear_fc2.weight (axis "etp"; only on e's EP rank)
  mlp.shared_experts.linear_fc1/linear_fc2.weight (TP-split like the dense MLP), mlp.shared_experts.gate_weight [1, h]
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.models.gpt.mlp import MLP
from megatron_lite.models.moe.dispatcher import build_dispatcher
from megatron_lite.models.moe.experts import GroupedExperts
from megatron_lite.models.moe.router import TopKRouter
from megatron_lite.process_groups import Group, ProcessGroups
from megatron_lite.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron_lite.tensor_parallel.random import is_recomputing
from megatron_lite.tensor_parallel.utils import set_init


def is_moe_layer(config: Config, layer_number: int) -> bool:
    return config.moe.is_moe and config.moe.layer_pattern(config.model.num_layers)[layer_number] == 1


def build_mlp(config: Config, layer_number: int, tp_group: Group, device: Optional[torch.device] = None,
              groups: Optional[ProcessGroups] = None) -> nn.Module:
    """The MLP of global layer `layer_number`: a MoELayer where --moe-layer-freq says so, else the dense MLP."""
    if not is_moe_layer(config, layer_number):
        return MLP(config, tp_group, device)
    layer = MoELayer(config, groups or ProcessGroups.single(), device)
    layer.layer_number = layer_number  # global: the row of its metrics (metrics.py)
    return layer


class SharedExpert(MLP):
    """A dense MLP every token goes through (--moe-shared-expert-intermediate-size); with
    --moe-shared-expert-gate its output is scaled by sigmoid(x . gate_weight) per token."""

    def __init__(self, config: Config, tp_group: Group, device: Optional[torch.device] = None) -> None:
        super().__init__(config, tp_group, device, ffn_hidden_size=config.moe.moe_shared_expert_intermediate_size)
        self.gate_weight = None
        if config.moe.moe_shared_expert_gate:
            self.gate_weight = nn.Parameter(torch.empty(1, config.model.hidden_size, dtype=config.params_dtype, device=device))
            set_init(self.gate_weight, "normal", config.model.init_method_std)
            self.gate_weight.sequence_parallel = True  # each TP rank gates its own tokens: grads summed over TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(torch.matmul(x, self.gate_weight.t()))
        return out


class MoELayer(nn.Module):
    """forward(x [s, b, h]) -> [s, b, h]; this rank's tokens only (s is the local sequence under SP/CP)."""

    def __init__(self, config: Config, groups: ProcessGroups, device: Optional[torch.device] = None) -> None:
        super().__init__()
        moe, parallel = config.moe, config.parallel
        ep, etp = parallel.expert_model_parallel_size, parallel.expert_tp_size
        if groups.ep.size != ep or groups.etp.size != etp:
            raise ConfigError(f"--expert-model-parallel-size/--expert-tensor-parallel-size: the config says EP {ep} x "
                              f"ETP {etp} but the process groups have EP {groups.ep.size} x ETP {groups.etp.size}. Pass "
                              "the ProcessGroups this rank runs under as groups=.")
        self.tp_group = groups.tp
        # Without sequence parallelism the TP ranks hold the same tokens (generation): each routes a 1/TP slice.
        self.split_over_tp = groups.tp.size > 1 and not parallel.sequence_parallel
        local = moe.num_experts // ep
        first = groups.ep.rank * local
        self.router = TopKRouter(config, groups, device)
        self.experts = GroupedExperts(config, list(range(first, first + local)), etp, device)
        self.shared_experts = (SharedExpert(config, groups.tp, device)
                               if moe.moe_shared_expert_intermediate_size is not None else None)
        self.dispatcher = build_dispatcher(moe.moe_token_dispatcher_type, moe.num_experts, ep, etp, groups.tp_ep)
        self.layer_number = 0
        self.stats: dict[str, torch.Tensor] = {}  # this step's sums over micro-batches (see models/moe/metrics.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        if self.split_over_tp:
            if self.training:  # megatron-core's rule (config refuses it for training runs too)
                raise ConfigError("--num-experts: training with tensor parallelism needs --sequence-parallel.")
            out = self._routed_tp_slices(x.reshape(s * b, h)).view(s, b, h)
        else:
            out = self._routed(x.reshape(s * b, h), s, b).view(s, b, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _routed(self, tokens: torch.Tensor, s: int, b: int) -> torch.Tensor:
        probs, routing_map = self.router(tokens, s, b)
        out = self.dispatcher(tokens, probs, routing_map, self.experts).to(tokens.dtype)
        if self.training and not is_recomputing():
            self._record(routing_map)
        return out

    def _routed_tp_slices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Replicated tokens (TP without SP, generation only): pad to a multiple of TP, route this rank's slice,
        gather the outputs over TP (rows are independent in inference, so the padding never mixes in)."""
        count, tp = tokens.shape[0], self.tp_group.size
        padded = torch.cat([tokens, tokens.new_zeros(((-count) % tp, tokens.shape[1]))])
        mine = padded.chunk(tp)[self.tp_group.rank]
        out = gather_from_sequence_parallel_region(self._routed(mine, mine.shape[0], 1), self.tp_group,
                                                   tensor_parallel_output_grad=False)
        return out[:count]

    @torch.no_grad()
    def _record(self, routing_map: torch.Tensor) -> None:
        """Per micro-batch: the router's losses, tokens per expert and pairs dropped (summed over the step)."""
        entries = {"tokens_per_expert": routing_map.sum(dim=0).float(), "microbatches": torch.ones(())}
        entries.update(self.router.stats)
        self.router.stats = {}
        for key, value in entries.items():
            value = value.detach().float().cpu()
            self.stats[key] = self.stats[key] + value if key in self.stats else value

