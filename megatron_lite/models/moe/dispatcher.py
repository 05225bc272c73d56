"""Token dispatchers: bring each (token, expert) pair to the ranks holding that expert, and back.

Both work over the ETP x EP group `tp_ep` (G = ETP x EP ranks; member j = ep * ETP + etp holds experts
[ep * E/EP, (ep + 1) * E/EP) split over ETP). Every rank routes its own tokens (with TP > 1, sequence
parallelism makes them distinct). Each ETP member of an expert computes a partial output for all of that
expert's tokens; the partials are summed where the outputs are combined.

- `alltoall` (megatron-core's MoEAlltoAllTokenDispatcher, folded into one exchange): pairs sorted by expert
  (`permute`) are sent to every ETP member of their expert's EP rank with one all_to_all_single (split sizes
  from an all-gather of every rank's tokens-per-expert), regrouped by local expert for the GEMMs, sent back
  the same way, and summed per token with the routing weights (`unpermute`). Megatron does an all-to-all
  over EP then an all-gather over ETP, and a reduce-scatter over ETP then an all-to-all back: the same pairs
  reach the same ranks; here the ETP partials are summed at the source instead.
- `allgather` (megatron-core's MoEAllGatherTokenDispatcher): all-gather tokens, weights and routing maps
  over the group, run the local experts on the pairs routed to them, and reduce-scatter the weighted sums
  back to the ranks the tokens came from.
A rank whose experts receive no tokens still runs every collective (empty GEMMs keep the graph connected).
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_lite import collectives
from megatron_lite.process_groups import Group
from megatron_lite.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)

Experts = Callable[[torch.Tensor, list[int]], torch.Tensor]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; backward sends the gradients back with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        collectives.all_to_all_single(out, x.contiguous(), group, output_split_sizes=output_splits,
                                      input_split_sizes=input_splits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def all_to_all(x: torch.Tensor, group: Group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    return x if group.size == 1 else _AllToAll.apply(x, group, output_splits, input_splits)


def gather_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """Every member's tokens-per-expert [G * E] (int64), in group order: the all-to-all's split sizes."""
    return collectives.all_gather(counts, group)


def gather_routing_map(routing_map: torch.Tensor, group: Group) -> torch.Tensor:
    """Every member's routing map, stacked along tokens (sent as uint8: gloo has no bool)."""
    return collectives.all_gather(routing_map.to(torch.uint8), group).bool()


def permute(routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert index, token index) of every routed pair, sorted by expert, then by token."""
    expert_idx, token_idx = routing_map.t().nonzero(as_tuple=True)
    return expert_idx, token_idx


def unpermute(pair_outputs: torch.Tensor, probs: torch.Tensor, expert_idx: torch.Tensor, token_idx: torch.Tensor,
              num_tokens: int) -> torch.Tensor:
    """Each token's sum over its pairs of routing weight x expert output, [num_tokens, h]."""
    weights = probs[token_idx, expert_idx].unsqueeze(-1).to(pair_outputs.dtype)
    out = pair_outputs.new_zeros((num_tokens, pair_outputs.shape[-1]))
    return out.index_add(0, token_idx, pair_outputs * weights)


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep_size: int, etp_size: int, group: Group) -> None:
        self.num_experts, self.ep_size, self.etp_size, self.group = num_experts, ep_size, etp_size, group
        self.local = num_experts // ep_size
        self.ep_rank = group.rank // etp_size

    def __call__(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        expert_idx, token_idx = permute(routing_map)
        counts = routing_map.sum(dim=0).to(torch.int64)  # [E] pairs per expert from this rank
        every = gather_counts(counts, self.group).view(self.group.size, self.ep_size, self.local)
        per_ep = counts.view(self.ep_size, self.local).sum(dim=1).tolist()  # pairs for each EP rank's experts
        starts = [sum(per_ep[:r]) for r in range(self.ep_size)]
        # Member j gets the pairs of EP rank j // ETP (each ETP member of an expert gets all its pairs).
        dest_ep = [j // self.etp_size for j in range(self.group.size)]
        send_index = torch.cat([torch.arange(starts[r], starts[r] + per_ep[r], device=tokens.device) for r in dest_ep])
        input_splits = [per_ep[r] for r in dest_ep]
        received_counts = every[:, self.ep_rank, :]  # [G, local]: pairs from member i for each local expert
        output_splits = received_counts.sum(dim=1).tolist()
        received = all_to_all(tokens[token_idx][send_index], self.group, output_splits, input_splits)
        # Regroup by local expert (the GEMMs want each expert's tokens together), and back.
        order = _by_expert_order(received_counts, tokens.device)
        outputs = experts(received[order], received_counts.sum(dim=0).tolist())
        outputs = torch.empty_like(outputs).index_copy(0, order, outputs) if outputs.shape[0] else outputs
        returned = all_to_all(outputs, self.group, input_splits, output_splits)
        pair_outputs = returned.new_zeros((token_idx.shape[0], returned.shape[-1])).index_add(0, send_index, returned)
        return unpermute(pair_outputs, probs, expert_idx, token_idx, tokens.shape[0])


def _by_expert_order(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows of a buffer laid out [member][local expert] reordered to [local expert][member]."""
    members, local = counts.shape
    flat = counts.reshape(-1).tolist()
    starts = [sum(flat[:i]) for i in range(len(flat))]
    pieces = [torch.arange(starts[i * local + e], starts[i * local + e] + flat[i * local + e], device=device)
              for e in range(local) for i in range(members)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64, device=device)


class AllGatherDispatcher:
    def __init__(self, num_experts: int, ep_size: int, etp_size: int, group: Group) -> None:
        self.group, self.local = group, num_experts // ep_size
        self.first_expert = (group.rank // etp_size) * self.local

    def __call__(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        all_tokens = gather_from_sequence_parallel_region(tokens, self.group)  # backward: reduce-scatter
        all_probs = gather_from_sequence_parallel_region(probs, self.group)
        all_map = gather_routing_map(routing_map, self.group)
        local_map = all_map[:, self.first_expert:self.first_expert + self.local]
        expert_idx, token_idx = permute(local_map)
        outputs = experts(all_tokens[token_idx], local_map.sum(dim=0).tolist())
        combined = unpermute(outputs, all_probs[:, self.first_expert:self.first_expert + self.local], expert_idx,
                             token_idx, all_tokens.shape[0])
        return reduce_scatter_to_sequence_parallel_region(combined, self.group)  # backward: all-gather


def build_dispatcher(kind: str, num_experts: int, ep_size: int, etp_size: int, group: Group):
    cls = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}[kind]
    return cls(num_experts, ep_size, etp_size, group)
