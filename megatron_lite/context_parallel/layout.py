"""The load-balanced causal layout of context parallelism, and the ring's block plan.

The sequence is cut into 2 x CP equal chunks; CP rank r holds chunks r and 2CP-1-r (in that order), so
under a causal mask every rank has the same number of (query, key) pairs to compute: an early chunk
(little to attend to) is paired with a late one (much to attend to).

Everything here is a pure function of (sequence length, CP size, CP rank): the attention code, the data
slicing and the load-balance test all read the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_lite.process_groups import Group

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def local_indices(seq_length: int, cp_size: int, cp_rank: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Global sequence indices of the tokens CP rank `cp_rank` holds: chunk r, then chunk 2CP-1-r."""
    if seq_length % (2 * cp_size) != 0:
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x CP = {2 * cp_size}")
    chunk = seq_length // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def gathered_indices(seq_length: int, cp_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Global indices of a sequence gathered over CP in rank order (what all-gather and all-to-all give)."""
    return torch.cat([local_indices(seq_length, cp_size, rank, device) for rank in range(cp_size)])


def global_positions(batch: int, local_seq: int, cp_group: Group, device: Optional[torch.device] = None) -> torch.Tensor:
    """Default position ids [b, s_local] of this rank's tokens (their true positions in the sequence)."""
    indices = local_indices(local_seq * cp_group.size, cp_group.size, cp_group.rank, device)
    return indices.expand(batch, local_seq)


def slice_batch_for_cp(batch: dict, cp_group: Group) -> dict:
    """This CP rank's part of a micro-batch: tokens, labels, loss mask and position ids [b, s] sliced along
    the sequence to its two chunks. The attention mask [b, 1, s, s] stays whole (the attention code picks
    the rows and columns it needs by global index)."""
    if cp_group.size == 1:
        return batch
    out = dict(batch)
    seq = batch["tokens"].shape[1]
    index = local_indices(seq, cp_group.size, cp_group.rank, batch["tokens"].device)
    for key in SEQUENCE_KEYS:
        if key in batch and batch[key] is not None:
            out[key] = batch[key].index_select(1, index).contiguous()
    return out


def block_mask(attention_mask: Optional[torch.Tensor], query_index: torch.Tensor,
               key_index: torch.Tensor) -> torch.Tensor:
    """[b or 1, 1, q, k] bool, True = masked: the rows/columns of the global mask (or causality) for
    queries and keys at these global indices."""
    if attention_mask is None:
        return (key_index[None, :] > query_index[:, None])[None, None]
    return attention_mask.index_select(2, query_index).index_select(3, key_index)


@dataclass(frozen=True)
class RingBlock:
    """One step of ring attention on one rank: its queries [q_start, q_end) against the K/V block of CP
    rank `kv_rank`, keys [k_start, k_end) of that block, with a mask (None: every pair is visible)."""
    step: int
    kv_rank: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    masked: bool

    @property
    def pairs(self) -> int:
        return (self.q_end - self.q_start) * (self.k_end - self.k_start)


def ring_plan(cp_size: int, cp_rank: int, local_seq: int, causal_only: bool) -> list[RingBlock]:
    """The blocks ring attention computes on `cp_rank`. With a plain causal mask, whole halves are skipped:
    from an earlier rank's block only its first chunk is visible (to all local queries), from a later
    rank's block only the local second chunk sees anything (all of it). A general (document) mask
    computes every block with its mask."""
    half = local_seq // 2
    plan = []
    for step in range(cp_size):
        kv_rank = (cp_rank - step) % cp_size
        if not causal_only or kv_rank == cp_rank:
            plan.append(RingBlock(step, kv_rank, 0, local_seq, 0, local_seq, True))
        elif kv_rank < cp_rank:
            plan.append(RingBlock(step, kv_rank, 0, local_seq, 0, half, False))
        else:
            plan.append(RingBlock(step, kv_rank, half, local_seq, 0, local_seq, False))
    return plan


def attention_pairs(cp_size: int, cp_rank: int, seq_length: int, comm_type: str) -> int:
    """(query, key) score pairs one rank computes per head under a causal mask: the attention FLOPs are
    4 x head_dim x this (QK^T and PV) per head. The ring counts its plan; all-gather computes its local
    queries against the whole sequence; Ulysses computes the whole sequence for heads / CP heads."""
    local = seq_length // cp_size
    if comm_type == "p2p":
        return sum(block.pairs for block in ring_plan(cp_size, cp_rank, local, causal_only=True))
    if comm_type == "all_gather":
        return local * seq_length
    if comm_type == "a2a":
        return seq_length * seq_length // cp_size
    raise ValueError(f"unknown comm type {comm_type!r}")


def visible_pairs(cp_size: int, cp_rank: int, seq_length: int) -> int:
    """Causally visible (query, key) pairs of this rank's queries: the useful work, equal on every rank."""
    queries = local_indices(seq_length, cp_size, cp_rank)
    return int((queries + 1).sum())
