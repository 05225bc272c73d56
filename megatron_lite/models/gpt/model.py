"""GPTModel: one model chunk (pipeline stage, or virtual stage) of a GPT-2 / Llama style decoder.

First stage (pre_process): token (+ learned position) embedding. Every stage: its transformer layers,
keyed by global layer number. Last stage (post_process): final norm, output layer (tied to the word
embedding or not) and the vocab-parallel cross entropy. Activations between stages are [s, b, h]
([s/tp, b, h] under sequence parallelism).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite.config import Config, ConfigError
from megatron_lite.context_parallel import global_positions
from megatron_lite.kernels.registry import select_kernels
from megatron_lite.models.gpt.transformer import InferenceContext, TransformerBlock, hidden_dropout_rng
from megatron_lite.process_groups import Group, ProcessGroups
from megatron_lite.tensor_parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding, mask_padded_vocab,
                                                  vocab_range)
from megatron_lite.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron_lite.tensor_parallel.shard_spec import shard_spec_of
from megatron_lite.tensor_parallel.utils import (InitArgs, initialize_param, pad_vocab_size, set_default_attributes,
                                                 set_init)

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


class LanguageModelEmbedding(nn.Module):
    """Word embeddings (vocab-parallel) + learned absolute positions, transposed to [s, b, h], split along
    the sequence under sequence parallelism, then hidden dropout."""

    def __init__(self, config: Config, tp_group: Group, device: Optional[torch.device] = None) -> None:
        super().__init__()
        m = config.model
        self.sequence_parallel = config.parallel.sequence_parallel
        self.tp_group = tp_group
        self.word_embeddings = VocabParallelEmbedding(
            m.vocab_size, m.hidden_size, divisible_by=m.make_vocab_size_divisible_by, init_std=m.init_method_std,
            reduce_scatter_embeddings=self.sequence_parallel, params_dtype=config.params_dtype, device=device,
            tp_group=tp_group)
        if m.position_embedding_type == "learned_absolute":
            # _weight: allocate without nn.Embedding's own random init (it would consume the global RNG).
            table = torch.empty(m.max_position_embeddings, m.hidden_size, dtype=config.params_dtype, device=device)
            self.position_embeddings = nn.Embedding(m.max_position_embeddings, m.hidden_size, _weight=table)
            set_init(self.position_embeddings.weight, "normal", m.init_method_std)
        else:
            self.position_embeddings = None
        self.hidden_dropout = m.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # [s/tp, b, h] under sequence parallelism, else [b, s, h]
        if not self.sequence_parallel:
            x = x.transpose(0, 1)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            positions = self.position_embeddings(position_ids).transpose(0, 1)  # [s, b, h]
            if self.sequence_parallel:  # backward all-gathers, so the table's grad is whole on every rank
                positions = scatter_to_sequence_parallel_region(positions, self.tp_group)
            x = x + positions
        x = x.contiguous()
        if self.training and self.hidden_dropout > 0:
            with hidden_dropout_rng(self.sequence_parallel):
                x = F.dropout(x, self.hidden_dropout, training=True)
        return x


class GPTModel(nn.Module):
    """A GPT model chunk. See docs/internals.md for parameter names, metadata and the chunk interface.

    `groups` (process_groups.ProcessGroups, default: one process) gives the tensor-parallel group the
    layers split over; the model reads no global parallel state.

    forward(input_ids [b, s], position_ids [b, s] | None, attention_mask [b, 1, s, s] bool (True = masked)
    | None (plain causal), labels [b, s] | None) returns
      - post_process with labels: per-token loss [b, s] (fp32);
      - post_process without labels: logits [b, s, padded_vocab / tp] (this TP rank's vocabulary slice;
        padding entries are -inf);
      - otherwise the hidden states [s, b, h] ([s/tp, b, h] under sequence parallelism).
    """

    def __init__(self, config: Config, pre_process: bool = True, post_process: bool = True,
                 layer_numbers: Optional[list[int]] = None, device: Optional[Union[str, torch.device]] = None,
                 groups: Optional[ProcessGroups] = None) -> None:
        super().__init__()
        m = config.model
        if m.vocab_size is None:
            raise ConfigError("--vocab-size: the model needs a vocabulary size. Set it, or let the tokenizer set it.")
        groups = groups or ProcessGroups.single()
        if groups.tp.size != config.parallel.tensor_model_parallel_size:
            raise ConfigError(f"--tensor-model-parallel-size: the config says {config.parallel.tensor_model_parallel_size} "
                              f"but the process groups given to GPTModel have TP = {groups.tp.size}. Pass the "
                              "ProcessGroups this rank runs under as groups= (the default is one process).")
        if groups.cp.size != config.parallel.context_parallel_size:
            raise ConfigError(f"--context-parallel-size: the config says {config.parallel.context_parallel_size} "
                              f"but the process groups given to GPTModel have CP = {groups.cp.size}.")
        self.config = config
        self.tp_group = groups.tp
        self.cp_group = groups.cp
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_numbers = list(range(m.num_layers)) if layer_numbers is None else list(layer_numbers)
        self.vocab_size = m.vocab_size
        self.tied = not m.untie_embeddings_and_output_weights
        self.input_tensor: Optional[torch.Tensor] = None
        self.kernels = select_kernels(config)

        if pre_process:
            self.embedding = LanguageModelEmbedding(config, self.tp_group, device)
        self.groups = groups
        self.decoder = TransformerBlock(config, self.layer_numbers, post_process, self.tp_group, device, groups.cp, groups)
        if post_process:
            padded = pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, self.tp_group.size)
            self.output_layer = ColumnParallelLinear(
                m.hidden_size, padded, bias=False, init_std=m.init_method_std,
                sequence_parallel=config.parallel.sequence_parallel,
                skip_weight_param_allocation=self.tied and pre_process,  # PP=1 tied: use the embedding's weight
                params_dtype=config.params_dtype, device=device, tp_group=self.tp_group, unpadded_size=m.vocab_size)
            self.vocab_start = vocab_range(padded, self.tp_group)[0]
        # Tied embeddings split over pipeline stages: the first stage's table and the last stage's copy
        # are kept equal by summing their grads over the embedding group.
        if self.tied and pre_process and not post_process:
            self.embedding.word_embeddings.weight.shared_embedding = True
        if self.tied and post_process and not pre_process:
            self.output_layer.weight.shared_embedding = True
            self.output_layer.weight.tied_copy = True  # counted once in global statistics (clip_grads)
        self.initialize(config.training.seed)

    @torch.no_grad()
    def initialize(self, seed: int) -> None:
        """Draw every parameter from (seed, global name); the tied copy from the embedding's name. Each
        parameter records what it was drawn from (`init_args`), so a model built on the meta device can be
        initialised later, shard by shard (DistributedDataParallel's `init_device`, ZeRO-3)."""
        for name, param in self.named_parameters():
            set_default_attributes(param)
            init_name = WORD_EMBEDDINGS if (name == "output_layer.weight" and self.tied) else name
            axis = self.groups.etp if shard_spec_of(param).axis == "etp" else self.tp_group  # experts: expert TP
            param.init_args = InitArgs(init_name, seed, axis.rank, axis.size)
            if not param.is_meta:  # meta: shape-only (converters, planning) or initialised later
                initialize_param(param, init_name, seed, axis.rank, axis.size)

    def sharding_plan(self) -> tuple[dict[str, list[nn.Module]], list[tuple[nn.Module, tuple[str, ...]]]]:
        """ZeRO-3 units and steps (distributed/zero3.py): units = the embedding, each transformer layer, the
        final norm with the output layer; steps in forward order = (module, units it needs). The final
        norm's step lasts to the end of forward, so it covers the output layer, which on a single tied stage
        multiplies by the embedding's weight and so needs the embedding unit too."""
        units: dict[str, list[nn.Module]] = {}
        steps: list[tuple[nn.Module, tuple[str, ...]]] = []
        if self.pre_process:
            units["embedding"] = [self.embedding]
            steps.append((self.embedding, ("embedding",)))
        for number, layer in self.decoder.layers.items():
            units[f"layer {number}"] = [layer]
            steps.append((layer, (f"layer {number}",)))
        if self.post_process:
            units["output"] = [self.decoder.final_layernorm, self.output_layer]
            tied_here = self.pre_process and self.output_layer.weight is None
            steps.append((self.decoder.final_layernorm, ("output", "embedding") if tied_here else ("output",)))
        return units, steps

    def set_input_tensor(self, input_tensor: Union[torch.Tensor, list, tuple, None]) -> None:
        """The activation received from the previous pipeline stage (used instead of the embedding)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight (the word embedding when tied on a single stage)."""
        if self.output_layer.weight is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                inference_context: Optional[InferenceContext] = None,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`inference_context` (generation only): keys/values of earlier tokens are read from and appended
        to it, and default positions continue from its offset; pass explicit position_ids when decoding.
        `loss_mask` [b, s] (with labels): the weights the loss function will give the per-token losses. A
        hint for the fused output layer (gradients computed during forward); any loss stays exact without it."""
        if inference_context is not None and position_ids is None and input_ids is not None:
            position_ids = inference_context.positions(input_ids.shape[1], input_ids.shape[0], input_ids.device)
        if self.pre_process:
            if position_ids is None and self.cp_group.size > 1:  # this rank's tokens' true positions
                position_ids = global_positions(input_ids.shape[0], input_ids.shape[1], self.cp_group, input_ids.device)
            x = self.embedding(input_ids, position_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("GPTModel without pre_process needs set_input_tensor() before forward")
            x = self.input_tensor
        x = self.decoder(x, attention_mask, position_ids, inference_context)
        if not self.post_process:
            return x
        if labels is not None and self.kernels.fuses_output_layer:
            loss = self.kernels.output_cross_entropy(
                self.output_layer.parallel_input(x), self.output_weight(), labels.transpose(0, 1), self.vocab_start,
                self.vocab_size, None if loss_mask is None else loss_mask.transpose(0, 1), self.tp_group)  # [s, b], fp32
            return loss.transpose(0, 1).contiguous()
        logits = self.output_layer(x, self.output_weight())  # [s, b, padded_vocab / tp]
        logits = mask_padded_vocab(logits, self.vocab_start, self.vocab_size)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = self.kernels.cross_entropy_fn(logits, labels.transpose(0, 1), self.tp_group)  # [s, b], fp32
        return loss.transpose(0, 1).contiguous()
