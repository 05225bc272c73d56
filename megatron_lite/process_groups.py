"""The process groups one rank takes part in, as one object handed to every component at construction.

`parallel_state.initialize_model_parallel` builds a `ProcessGroups` (the idea of megatron-core's
ProcessGroupCollection); the model, its tensor-parallel layers, DDP, the optimizer, the pipeline engine
and the data code receive it instead of reading global state. A `Group` knows its name, its members
(global ranks, in group order) and this rank's index, so code can ask `groups.tp.size` or
`groups.pp.rank` without any torch.distributed call; `handle` is the torch ProcessGroup that
`collectives.py` communicates over (None for a group of one member, which never communicates).

`ProcessGroups.single()` is the layout of one process (every group of size 1): a model built with it is
the single-process reference every parallel layout is compared with. Adding a kind of parallelism
(context, expert) means adding a field here, not a global.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True, eq=False)
class Group:
    """One communication group as seen from one rank."""
    name: str
    ranks: tuple[int, ...]  # global ranks, group order
    rank: int  # this process's index in `ranks`
    handle: Any = None  # torch.distributed ProcessGroup (None when the group has one member)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, group_rank: int) -> int:
        """The global rank of group member `group_rank` (what p2p and broadcast `src` take)."""
        return self.ranks[group_rank]

    @property
    def first(self) -> int:
        return self.ranks[0]

    @property
    def last(self) -> int:
        return self.ranks[-1]

    @classmethod
    def single(cls, name: str, global_rank: int = 0) -> "Group":
        return cls(name, (global_rank,), 0, None)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, ranks={list(self.ranks)}, rank={self.rank})"


# Field name -> megatron-core's group (all slices of one rank grid; see parallel_state).
GROUP_FIELDS = ("world", "tp", "pp", "dp", "dp_cp", "cp", "mp", "tp_cp", "tp_dp", "tp_dp_cp",
                "ep", "expert_dp", "tp_ep", "etp", "tp_ep_pp")


@dataclass(frozen=True)
class ProcessGroups:
    """Every group of this rank. `embd` (first and last pipeline stage, for tied embeddings) is None on
    the middle stages, which belong to no embedding group."""
    world: Group
    tp: Group
    pp: Group
    dp: Group
    dp_cp: Group  # data-parallel x context-parallel: gradients are averaged over it
    cp: Group
    mp: Group  # tp x pp: global statistics (grad norm) without the DP replicas
    tp_cp: Group
    tp_dp: Group
    tp_dp_cp: Group
    ep: Group
    expert_dp: Group
    tp_ep: Group  # expert TP x EP: the group a MoE layer dispatches tokens over
    etp: Group  # expert tensor parallel (each expert's MLP split over it)
    tp_ep_pp: Group  # ETP x EP x PP: every expert shard exactly once (expert grad norm)
    embd: Optional[Group] = None
    vp_size: Optional[int] = None  # virtual pipeline stages per rank (None: no interleaving)
    # ZB-V (--pipeline-schedule zbv): the last virtual stage, and so the loss, is on pipeline rank 0
    loss_on_first_stage: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def single(cls, global_rank: int = 0) -> "ProcessGroups":
        """The groups of a one-process layout: nothing is ever communicated."""
        groups = {name: Group.single(name, global_rank) for name in GROUP_FIELDS}
        return cls(**groups, embd=Group.single("embd", global_rank))

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    @property
    def is_loss_stage(self) -> bool:
        """This rank computes the loss (the last virtual stage): the last pipeline rank, rank 0 with ZB-V."""
        return self.is_first_stage if self.loss_on_first_stage else self.is_last_stage

    @property
    def loss_stage_rank(self) -> int:
        """Global rank of this pipeline's loss stage (the `src` of loss broadcasts)."""
        return self.pp.first if self.loss_on_first_stage else self.pp.last

    def replace(self, **changes: Any) -> "ProcessGroups":
        return dataclasses.replace(self, **changes)
