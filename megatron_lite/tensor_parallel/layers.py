"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Parameters are allocated empty and tagged with their sharding (a ShardSpec, shard_spec.py) and their
init (utils.set_init); the model initialises them from their global names afterwards, so the
same seed gives the same full weights in every layout.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_lite import collectives
from megatron_lite.process_groups import Group
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region)
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, reduced_grad, set_shard_spec
from megatron_lite.tensor_parallel.utils import pad_vocab_size, set_init

_ONE_RANK = Group.single("tp")


def _empty(*shape: int, dtype: torch.dtype, device: Optional[torch.device]) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class _LinearDelayedWgrad(torch.autograd.Function):
    """F.linear whose backward computes the input gradient (and the bias's) and appends the weight
    gradient's computation to `queue` instead of running it (--delay-wgrad-compute: the pipeline's W
    action runs the queue later). The weight gradient reaches the parameter through autograd
    (weight.backward), so accumulation into .grad and DDP's post-accumulate hooks behave as usual."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_data: torch.Tensor, bias: Optional[torch.Tensor], weight_holder: tuple,
                queue: list) -> torch.Tensor:
        # The parameter travels in a tuple, and its detached data as the tensor input, so that B's graph has no
        # edge to the weight at all: autograd would otherwise visit its AccumulateGrad in B with no gradient and
        # fire post-accumulate hooks (DDP would mark the weight ready before W has computed its gradient).
        ctx.save_for_backward(x)
        ctx.weight, ctx.has_bias, ctx.queue = weight_holder[0], bias is not None, queue
        return F.linear(x, weight_data, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_input = grad_output.matmul(weight)
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_bias = grad_2d.sum(0) if ctx.has_bias else None
        ctx.queue.append(DeferredWeightGrad(weight, grad_2d, x.reshape(-1, x.shape[-1])))
        return grad_input, None, grad_bias, None, None


class DeferredWeightGrad:
    """One queued weight gradient, dW = grad^T x, run by the pipeline's W action. Until then it keeps this
    GEMM's output gradient [tokens, out] and input [tokens, in] alive (after B has freed autograd's saved
    tensors): `tensors`, which planner/measure.py counts as activation memory from B to W."""
    __slots__ = ("weight", "grad", "input")

    def __init__(self, weight: torch.Tensor, grad: torch.Tensor, input: torch.Tensor) -> None:
        self.weight, self.grad, self.input = weight, grad, input

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grad, self.input

    def __call__(self) -> None:
        self.weight.backward(self.grad.t().mm(self.input))


def _linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The module's GEMM; with a weight-gradient queue set (split backward) and a weight that needs a
    gradient, the weight gradient is deferred to that queue."""
    # only the plain GEMM is split (a kernel that replaced linear_fn, e.g. Transformer Engine's fp8, is not)
    if module.wgrad_queue is not None and weight.requires_grad and torch.is_grad_enabled() \
            and module.linear_fn is F.linear:
        return _LinearDelayedWgrad.apply(x, weight.detach(), bias, (weight,), module.wgrad_queue)
    return module.linear_fn(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dimension: each TP rank computes Y's columns.

    Input [s, b, in] is replicated (or [s/tp, b, in] under sequence parallelism, all-gathered here);
    output [s, b, out/tp], or all of `out` with gather_output. `stride` > 1 marks a weight made of
    several blocks that are each split over TP (SwiGLU's [gate; up]). With skip_weight_param_allocation
    the weight is passed to forward (the tied output layer). `tp_group` is the tensor-parallel group
    (default: one rank).
    """
    # The GEMM: kernels/registry.py replaces it per instance with Transformer Engine's under --fp8-format.
    linear_fn = staticmethod(F.linear)
    # Set (to a list) by the pipeline runner for schedules that split backward into B and W.
    wgrad_queue: Optional[list] = None

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, gather_output: bool = False,
                 init_std: float = 0.02, stride: int = 1, sequence_parallel: bool = False,
                 skip_weight_param_allocation: bool = False, params_dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, tp_group: Optional[Group] = None,
                 unpadded_size: Optional[int] = None) -> None:
        super().__init__()
        self.tp_group = tp_group or _ONE_RANK
        tp_size = self.tp_group.size
        if output_size % tp_size != 0:
            raise ValueError(f"output size {output_size} is not divisible by the TP size {tp_size}")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = output_size // tp_size
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        spec = ShardSpec(partition_dim=0, stride=stride, unpadded_size=unpadded_size)
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = _empty(self.output_size_per_partition, input_size, dtype=params_dtype, device=device)
            set_shard_spec(self.weight, spec)
            set_init(self.weight, "normal", init_std)
        if bias:
            self.bias = _empty(self.output_size_per_partition, dtype=params_dtype, device=device)
            set_shard_spec(self.bias, ShardSpec(partition_dim=0, stride=stride))
            set_init(self.bias, "zeros")
        else:
            self.register_parameter("bias", None)

    def parallel_input(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM's input on this rank: the all-gathered sequence under sequence parallelism, else x
        (whose gradient is all-reduced over TP in backward). Fused output kernels start from here."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(x, self.tp_group)
        return copy_to_tensor_model_parallel_region(x, self.tp_group)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        y = _linear(self, self.parallel_input(x), weight, self.bias)
        return gather_from_tensor_model_parallel_region(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dimension: X arrives split along its last dim (the
    output of a column-parallel layer); partial products are summed over TP (all-reduce), or
    reduce-scattered along the sequence under sequence parallelism. The bias is added once, after."""
    linear_fn = staticmethod(F.linear)  # see ColumnParallelLinear
    wgrad_queue: Optional[list] = None  # see ColumnParallelLinear

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, init_std: float = 0.02,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, tp_group: Optional[Group] = None) -> None:
        super().__init__()
        self.tp_group = tp_group or _ONE_RANK
        tp_size = self.tp_group.size
        if input_size % tp_size != 0:
            raise ValueError(f"input size {input_size} is not divisible by the TP size {tp_size}")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size // tp_size
        self.sequence_parallel = sequence_parallel
        self.weight = _empty(output_size, self.input_size_per_partition, dtype=params_dtype, device=device)
        set_shard_spec(self.weight, ShardSpec(partition_dim=1))
        set_init(self.weight, "normal", init_std)
        if bias:
            self.bias = _empty(output_size, dtype=params_dtype, device=device)
            set_shard_spec(self.bias, ShardSpec())
            set_init(self.bias, "zeros")
            # Under sequence parallelism each rank adds the bias to its part of the sequence only.
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size == 1 and not self.sequence_parallel:  # nothing to reduce: the bias goes into the GEMM
            return _linear(self, x, self.weight, self.bias)
        y = _linear(self, x, self.weight, None)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group)
        else:
            y = reduce_from_tensor_model_parallel_region(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the (padded) vocabulary: each rank looks up the tokens in its range,
    writes zeros for the others, and the partial results are summed over TP.

    num_embeddings is the real vocabulary; the table is padded to a multiple of divisible_by x TP with
    zero rows (its ShardSpec records the real size, so the canonical full tensor is unpadded).
    Returns [b, s, h] replicated over TP; with reduce_scatter_embeddings (sequence parallelism) returns
    [s/tp, b, h], this rank's part of the sequence: a reduce-scatter moves half the bytes of an all-reduce.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, divisible_by: int = 1, init_std: float = 0.02,
                 reduce_scatter_embeddings: bool = False, params_dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, tp_group: Optional[Group] = None) -> None:
        super().__init__()
        self.tp_group = tp_group or _ONE_RANK
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        self.num_embeddings = num_embeddings
        self.padded_num_embeddings = pad_vocab_size(num_embeddings, divisible_by, self.tp_group.size)
        self.vocab_start_index, self.vocab_end_index = vocab_range(self.padded_num_embeddings, self.tp_group)
        self.weight = _empty(self.vocab_end_index - self.vocab_start_index, embedding_dim, dtype=params_dtype, device=device)
        set_shard_spec(self.weight, ShardSpec(partition_dim=0, unpadded_size=num_embeddings))
        set_init(self.weight, "normal", init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size == 1 and not self.reduce_scatter_embeddings:  # whole vocabulary here: no mask pass
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1), self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, self.tp_group)


def vocab_range(padded_vocab_size: int, tp_group: Group) -> tuple[int, int]:
    """[start, end) of this TP rank's slice of the padded vocabulary."""
    per_rank = padded_vocab_size // tp_group.size
    return tp_group.rank * per_rank, (tp_group.rank + 1) * per_rank


def mask_padded_vocab(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Set the logits of padding entries (global index >= vocab_size) to -inf, so they never win a
    softmax and padding never changes the loss: TP=1 and TP=4 give the same loss for any vocabulary.

    Works in place (the logits are the largest activation; a matmul does not need its output for
    backward), except on a leaf that requires grad."""
    num_real = vocab_size - vocab_start
    if num_real >= logits.shape[-1]:
        return logits
    padded = torch.arange(logits.shape[-1], device=logits.device) >= num_real
    if logits.is_leaf and logits.requires_grad:
        return logits.masked_fill(padded, float("-inf"))
    return logits.masked_fill_(padded, float("-inf"))


def allreduce_sequence_parallel_grads(model_chunks: Iterable[nn.Module], tp_group: Group) -> None:
    """All-reduce over TP the grads of parameters replicated over TP but fed only part of the sequence
    (norm weights, row-parallel biases, under sequence parallelism). Uses shard_spec.reduced_grad
    (DDP's main_grad, or its ZeRO-2 shard piece). One coalesced all-reduce."""
    if tp_group.size == 1:
        return
    grads = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if getattr(param, "sequence_parallel", False) and param.requires_grad:
                grad = reduced_grad(param)
                if grad is not None:
                    grads.append(grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    collectives.all_reduce(flat, tp_group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
