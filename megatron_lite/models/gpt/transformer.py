"""Transformer layer of a GPT: pre-norm attention and MLP blocks with residuals, on [seq, batch, hidden].

Reads like nanoGPT; tensor parallelism lives in the column/row-parallel linears, sequence parallelism
in the regions those linears gather from / scatter to, so this file has no TP branches.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.config import Config
from megatron_lite.context_parallel import context_parallel_attention, global_positions
from megatron_lite.kernels.registry import select_kernels
from megatron_lite.kernels.rope import rope_cos_sin, rope_scaling_of
from megatron_lite.models.gpt.mlp import output_init_std
from megatron_lite.process_groups import Group, ProcessGroups
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_lite.tensor_parallel.random import checkpoint, get_rng_tracker
from megatron_lite.tensor_parallel.utils import set_init


def hidden_dropout_rng(sequence_parallel: bool) -> ContextManager:
    """Dropout on hidden states: under sequence parallelism each TP rank holds a different part of the
    sequence, so it uses its own stream; otherwise all TP ranks hold the same tensor and must draw
    the same mask from the shared default stream."""
    return get_rng_tracker().fork() if sequence_parallel else contextlib.nullcontext()


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight), per --normalization. Replicated over TP; under
    sequence parallelism its grads come from part of the sequence only, hence `sequence_parallel`."""

    def __init__(self, config: Config, hidden_size: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.rms = config.model.normalization == "RMSNorm"
        self.eps = config.model.norm_epsilon
        self.kernels = select_kernels(config)  # fast paths chosen once (kernels/registry.py)
        sequence_parallel = config.parallel.sequence_parallel
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=config.params_dtype, device=device))
        set_init(self.weight, "ones")
        self.weight.sequence_parallel = sequence_parallel
        if self.rms:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(hidden_size, dtype=config.params_dtype, device=device))
            set_init(self.bias, "zeros")
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)


class InferenceContext:
    """KV cache for incremental decoding: each layer's keys and values [s, b, groups, d] (after RoPE) of
    the tokens seen so far. `offset` counts them; the caller advances it after each full forward, so
    every layer (and pipeline stage) of one forward sees the same offset. Appending by concatenation
    keeps it simple; generation lengths here are short enough that the copies do not matter."""

    def __init__(self) -> None:
        self.offset = 0
        self.key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(self, seq: int, batch: int, device: torch.device) -> torch.Tensor:
        """Position ids [b, s] of the next `seq` tokens."""
        return torch.arange(self.offset, self.offset + seq, device=device).expand(batch, seq)

    def append(self, layer_number: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_number in self.key_values:
            past_k, past_v = self.key_values[layer_number]
            k, v = torch.cat([past_k, k], dim=0), torch.cat([past_v, v], dim=0)
        self.key_values[layer_number] = (k, v)
        return k, v

    def causal_mask(self, seq: int, total: int, device: torch.device) -> torch.Tensor:
        """[1, 1, seq, total], True = masked: new token i (position offset + i) sees keys 0..offset + i."""
        return torch.ones(seq, total, dtype=torch.bool, device=device).triu(self.offset + 1)[None, None]

    def advance(self, seq: int) -> None:
        self.offset += seq


class SelfAttention(nn.Module):
    """Causal self-attention, multi-head or grouped-query, optionally with RoPE.

    linear_qkv's output per TP rank is [groups_local, heads_per_group + 2, head_dim]: each query group's
    queries, then its key, then its value (Megatron's layout), so TP splits whole groups.
    """

    def __init__(self, config: Config, tp_group: Group, device: Optional[torch.device] = None,
                 cp_group: Optional[Group] = None) -> None:
        super().__init__()
        m = config.model
        tp_size = tp_group.size
        self.cp_group = cp_group if cp_group is not None and cp_group.size > 1 else None  # context parallelism
        self.cp_comm_type = config.parallel.cp_comm_type
        self.head_dim = m.head_dim
        self.heads_local = m.num_attention_heads // tp_size
        self.groups_local = m.num_query_groups // tp_size
        self.heads_per_group = m.num_attention_heads // m.num_query_groups
        self.attention_dropout = m.attention_dropout
        self.rotary_dim = int(self.head_dim * m.rotary_percent) if m.position_embedding_type == "rope" else 0
        self.rotary_base = m.rotary_base
        self.rope_scaling = rope_scaling_of(m)
        self.recompute_core = m.recompute_granularity == "selective"
        self.kernels = select_kernels(config)
        qkv_size = m.num_query_groups * (self.heads_per_group + 2) * self.head_dim
        common = dict(sequence_parallel=config.parallel.sequence_parallel, params_dtype=config.params_dtype, device=device,
                      tp_group=tp_group)
        self.linear_qkv = ColumnParallelLinear(m.hidden_size, qkv_size, bias=m.add_bias_linear or m.add_qkv_bias,
                                               init_std=m.init_method_std, **common)
        self.linear_proj = RowParallelLinear(m.num_attention_heads * self.head_dim, m.hidden_size, bias=m.add_bias_linear,
                                             init_std=output_init_std(config), **common)
        self.q_layernorm = self.k_layernorm = None
        if m.qk_layernorm:  # per-head norms (--qk-layernorm); each TP rank's grads cover its heads only
            self.q_layernorm, self.k_layernorm = Norm(config, self.head_dim, device), Norm(config, self.head_dim, device)
            for param in (*self.q_layernorm.parameters(), *self.k_layernorm.parameters()):
                param.sequence_parallel = True  # i.e. all-reduce the grad over TP (finalize_model_grads)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        dropout_p = self.attention_dropout if self.training else 0.0
        # This rank's heads are its own: their dropout masks come from the TP-rank stream.
        rng = get_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:
            if self.cp_group is not None:  # the sequence is split over CP: context_parallel/ attends over all of it
                return context_parallel_attention(q, k, v, attention_mask, self.cp_group, self.cp_comm_type,
                                                  self.kernels.attention_fn, dropout_p)
            return self.kernels.attention_fn(q, k, v, attention_mask, dropout_p=dropout_p, causal=True)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor],
                position_ids: Optional[torch.Tensor], inference_context: Optional[InferenceContext] = None) -> torch.Tensor:
        qkv = self.linear_qkv(x)  # [s, b, groups_local * (heads_per_group + 2) * head_dim]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.groups_local, self.heads_per_group + 2, self.head_dim)
        # One split (its backward is a single cat), not three slices (each backward zero-fills a whole qkv-sized grad).
        q, k, v = torch.split(qkv, [self.heads_per_group, 1, 1], dim=3)
        q = q.reshape(s, b, self.heads_local, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.rotary_dim:
            if position_ids is None and self.cp_group is not None:  # this rank's tokens' true positions
                position_ids = global_positions(b, s, self.cp_group, x.device)
            elif position_ids is None:
                start = inference_context.offset if inference_context is not None else 0
                position_ids = torch.arange(start, start + s, device=x.device).expand(b, s)
            cos, sin = rope_cos_sin(position_ids, self.rotary_dim, self.rotary_base, dtype=q.dtype, scaling=self.rope_scaling)
            q, k = self.kernels.apply_rotary(q, cos, sin), self.kernels.apply_rotary(k, cos, sin)
        if inference_context is not None:
            k, v = inference_context.append(self.layer_number, k, v)
            if attention_mask is None and inference_context.offset > 0:
                # Queries are the last s of k.shape[0] positions: the plain causal mask would misalign.
                attention_mask = inference_context.causal_mask(s, k.shape[0], x.device)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if self.recompute_core and torch.is_grad_enabled():
            context = checkpoint(self.core_attention, q, k, v, attention_mask)
        else:
            context = self.core_attention(q, k, v, attention_mask)
        context = context.permute(2, 0, 1, 3).reshape(s, b, self.heads_local * self.head_dim)
        return self.linear_proj(context)


class TransformerLayer(nn.Module):
    """x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x)))."""

    def __init__(self, config: Config, layer_number: int, tp_group: Group, device: Optional[torch.device] = None,
                 cp_group: Optional[Group] = None, groups: Optional[ProcessGroups] = None) -> None:
        super().__init__()
        self.layer_number = layer_number  # global, 0-based
        self.hidden_dropout = config.model.hidden_dropout
        self.sequence_parallel = config.parallel.sequence_parallel
        self.input_layernorm = Norm(config, config.model.hidden_size, device)
        self.self_attention = SelfAttention(config, tp_group, device, cp_group)
        self.self_attention.layer_number = layer_number  # its key in an InferenceContext
        self.pre_mlp_layernorm = Norm(config, config.model.hidden_size, device)
        from megatron_lite.models.moe.moe_layer import build_mlp  # (moe_layer builds on gpt/mlp.py: import here)
        self.mlp = build_mlp(config, layer_number, tp_group, device, groups)  # dense MLP, or MoE (models/moe/)

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.hidden_dropout == 0.0:
            return x
        with hidden_dropout_rng(self.sequence_parallel):
            return F.dropout(x, self.hidden_dropout, training=True)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                inference_context: Optional[InferenceContext] = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.input_layernorm(x), attention_mask, position_ids, inference_context))
        return x + self.dropout(self.mlp(self.pre_mlp_layernorm(x)))


class TransformerBlock(nn.Module):
    """The layers this model chunk holds (keyed by global layer number) and, on the last stage, the
    final norm; applies --recompute-granularity full (uniform or block) here."""

    def __init__(self, config: Config, layer_numbers: list[int], post_process: bool, tp_group: Group,
                 device: Optional[torch.device] = None, cp_group: Optional[Group] = None,
                 groups: Optional[ProcessGroups] = None) -> None:
        super().__init__()
        m = config.model
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, i, tp_group, device, cp_group, groups)
                                     for i in layer_numbers})
        for layer in self.layers.values():
            select_kernels(config).compile_layer(layer)  # --torch-compile: in place, names unchanged
        self.final_layernorm = Norm(config, m.hidden_size, device) if post_process else None
        self.recompute_full = m.recompute_granularity == "full"
        self.recompute_method = m.recompute_method
        self.recompute_num_layers = m.recompute_num_layers or 1

    def _run_layers(self, layers: list[nn.Module]) -> Callable:
        def run(x: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]) -> torch.Tensor:
            for layer in layers:
                x = layer(x, attention_mask, position_ids)
            return x
        return run

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                inference_context: Optional[InferenceContext] = None) -> torch.Tensor:
        layers = list(self.layers.values())
        if inference_context is not None:  # generation: no grad, no recompute
            for layer in layers:
                x = layer(x, attention_mask, position_ids, inference_context)
        elif self.recompute_full and torch.is_grad_enabled():
            if self.recompute_method == "uniform":
                # Checkpoint groups of recompute_num_layers layers: only each group's input is kept.
                for start in range(0, len(layers), self.recompute_num_layers):
                    group = layers[start:start + self.recompute_num_layers]
                    x = checkpoint(self._run_layers(group), x, attention_mask, position_ids)
            else:  # block: the first recompute_num_layers layers of this chunk, each on its own
                for index, layer in enumerate(layers):
                    if index < self.recompute_num_layers:
                        x = checkpoint(layer, x, attention_mask, position_ids)
                    else:
                        x = layer(x, attention_mask, position_ids)
        else:
            for layer in layers:
                x = layer(x, attention_mask, position_ids)
        return self.final_layernorm(x) if self.final_layernorm is not None else x
