"""A toy stage model with GPTModel's chunk interface, for pipeline tests and the bubble benchmark.

Embedding (first stage) -> residual tanh-MLP layers keyed by global layer number -> output layer and
per-token cross-entropy (last stage). Every parameter is drawn from a generator seeded by its global
name, so any stage layout holds exactly the pieces of the single-process model (layout-invariant init).
"""
from __future__ import annotations

import zlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.config import Config


def _seeded(shape: tuple[int, ...], name: str, seed: int, std: float = 0.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


class ToyStage(nn.Module):
    def __init__(self, pre_process: bool, post_process: bool, layer_numbers: list[int], vocab: int = 16,
                 hidden: int = 8, seed: int = 0, tied: bool = True):
        super().__init__()
        self.pre_process, self.post_process, self.tied = pre_process, post_process, tied
        self.input_tensor: Optional[torch.Tensor] = None
        pipelined = parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1
        if pre_process:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = nn.Embedding(vocab, hidden)
            self.embedding.word_embeddings.weight.data.copy_(_seeded((vocab, hidden), "embedding.word_embeddings.weight", seed))
            if tied and pipelined:
                self.embedding.word_embeddings.weight.shared_embedding = True
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleDict()
        for number in layer_numbers:
            layer = nn.Linear(hidden, hidden)
            layer.weight.data.copy_(_seeded((hidden, hidden), f"decoder.layers.{number}.weight", seed))
            layer.bias.data.copy_(_seeded((hidden,), f"decoder.layers.{number}.bias", seed))
            self.decoder.layers[str(number)] = layer
        if post_process and not (tied and pre_process):
            self.output_layer = nn.Linear(hidden, vocab, bias=False)
            name = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
            self.output_layer.weight.data.copy_(_seeded((vocab, hidden), name, seed))
            if tied:
                self.output_layer.weight.shared_embedding = True

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        self.input_tensor = tensor

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding.word_embeddings(tokens).transpose(0, 1) if self.pre_process else self.input_tensor
        for layer in self.decoder.layers.values():
            hidden = hidden + torch.tanh(layer(hidden))  # ends in an add: the output can be deallocated
        if not self.post_process:
            return hidden
        weight = self.embedding.word_embeddings.weight if self.tied and self.pre_process else self.output_layer.weight
        logits = hidden @ weight.t()  # [s, b, vocab]
        return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # [b, s]


def toy_config(num_layers: int, pp: int, vp: Optional[int] = None, schedule: str = "auto", hidden: int = 8,
               seq_length: int = 6, micro_batch_size: int = 2, num_microbatches: Optional[int] = None,
               group_size: Optional[int] = None, overlap_p2p_comm: bool = False) -> Config:
    cfg = Config(world_size=pp)
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = num_layers, hidden, 2
    cfg.model.seq_length = seq_length
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.parallel.virtual_pipeline_model_parallel_size = vp
    cfg.parallel.pipeline_schedule = schedule
    cfg.parallel.microbatch_group_size_per_vp_stage, cfg.parallel.overlap_p2p_comm = group_size, overlap_p2p_comm
    cfg.training.micro_batch_size = micro_batch_size
    cfg.training.global_batch_size = micro_batch_size * (num_microbatches or pp)
    return cfg.validate()


def toy_microbatches(count: int, micro_batch_size: int, seq_length: int, vocab: int = 16, seed: int = 7) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, vocab, (micro_batch_size, seq_length), generator=generator),
             "labels": torch.randint(0, vocab, (micro_batch_size, seq_length), generator=generator)}
            for _ in range(count)]


def toy_forward_step(data_iterator: Iterator, model: nn.Module):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["labels"])

    def loss_func(per_token_loss: torch.Tensor):
        loss = per_token_loss.mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func
