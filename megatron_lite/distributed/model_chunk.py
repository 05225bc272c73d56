"""ModelChunk: what the pipeline schedules, the optimizer and checkpointing need from one model chunk.

Every consumer talks to this interface instead of probing a wrapper with hasattr:
- `module`: the wrapped model chunk (global parameter names, `set_input_tensor` for non-first stages);
- gradients: `no_sync()` (accumulate only), `zero_grad_buffer()`, `start_grad_sync()`/`finish_grad_sync()`
  (data-parallel reduction), `param_and_grad_buffers` (the contiguous buffers the distributed optimizer
  shards; empty when there are none);
- parameters: `start_param_sync()`/`finish_param_sync()` (the distributed optimizer's all-gather; ZeRO-3:
  back to rest), `param_slice()` (where the optimizer reads and writes a flat slice of a parameter);
- `sharded_state()`: {global name: parameter} with every parameter's ShardSpec attached, after any
  pending parameter all-gather has finished (ZeRO-3: gathered);
- `local_slices()`: {global name: (parameter, [(start, end, flat view)])}, what this rank holds of each
  parameter at rest without gathering anything (ZeRO-3: its pieces of the persistent shard): what
  sharded checkpoints save and load.

`DistributedDataParallel` (ddp.py) implements it with data-parallel reduction; `LocalChunk` implements it
for a chunk that is not data-parallel (one process, inference, unit tests): gradients stay in `.grad`.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from megatron_lite.distributed.zero3 import ShardedParams


class ModelChunk(nn.Module):
    """Base of both wrappers: forwarding, naming and state dicts are the wrapped module's."""

    module: nn.Module
    zero3: Optional["ShardedParams"] = None  # ZeRO-3's gather/free of the parameters (ddp.py), else None

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    # ---- the model interface ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_input_tensor(self, input_tensor) -> None:
        self.module.set_input_tensor(input_tensor)

    @property
    def param_and_grad_buffers(self) -> list:
        return []

    @property
    def shards_optimizer_state(self) -> bool:
        """True when the distributed optimizer owns slices of this chunk's buffers (ZeRO-1 and beyond)."""
        return False

    # ---- gradients -------------------------------------------------------------------------------
    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def zero_grad_buffer(self) -> None:
        for param in self.module.parameters():
            param.grad = None

    def start_grad_sync(self) -> None:
        pass

    def finish_grad_sync(self) -> None:
        pass

    # ---- parameters ------------------------------------------------------------------------------
    def start_param_sync(self, force_sync: bool = False) -> None:
        pass

    def finish_param_sync(self) -> None:
        pass

    def param_slice(self, param: nn.Parameter, start: int, end: int):
        """The tensor holding param's flat [start, end) at rest, which the optimizer reads and writes (a view
        of the parameter; under ZeRO-3 of this rank's persistent shard, ddp.py)."""
        return param.detach().view(-1)[start:end]

    def sharded_state(self) -> dict[str, nn.Parameter]:
        """{global name: parameter}; parameters are whole (no pending all-gather) when this returns."""
        self.finish_param_sync()
        return dict(self.module.named_parameters())

    def local_slices(self) -> dict[str, tuple[nn.Parameter, list[tuple[int, int, torch.Tensor]]]]:
        """{global name: (parameter, [(start, end, flat tensor)])}: the flat ranges of each parameter this rank
        holds at rest, as tensors that read and write them; the whole parameter, or under ZeRO-3 its pieces
        in this rank's persistent shard (possibly none). Gathers nothing."""
        self.finish_param_sync()
        pieces = self.zero3.local_pieces() if self.zero3 is not None else {}
        return {name: (param, pieces[id(param)] if id(param) in pieces else [(0, param.numel(), param.detach().view(-1))])
                for name, param in self.module.named_parameters()}

    def state_dict(self, *args, **kwargs):
        self.finish_param_sync()  # never save half-gathered parameters
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.finish_param_sync()
        # copy_ (not assign) keeps param.data pointing into any contiguous parameter buffer.
        return self.module.load_state_dict(state_dict, strict=strict)


class LocalChunk(ModelChunk):
    """A chunk without data-parallel reduction: gradients stay in `.grad`."""


def as_model_chunks(model: Union[nn.Module, list, tuple]) -> list[ModelChunk]:
    """Model chunks as ModelChunks: wrappers pass through, bare modules are wrapped in LocalChunk."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return [chunk if isinstance(chunk, ModelChunk) else LocalChunk(chunk) for chunk in chunks]


def iter_params(chunks: list[ModelChunk]) -> Iterator[nn.Parameter]:
    for chunk in chunks:
        yield from chunk.module.parameters()
