"""Process groups for tensor (TP), context (CP), expert (EP), data (DP) and pipeline (PP) parallelism.

All groups are slices of one rank grid in Megatron-core's default order "tp-cp-ep-dp-pp" (TP fastest):
    grid = arange(world).reshape(pp, dp, ep, cp, tp)
A group for a set of dimensions holds the ranks that differ only along those dimensions. This gives
exactly megatron-core's `RankGenerator` memberships for the same sizes. As in megatron-core, the dense
groups use EP = 1 and the expert groups come from a second grid over the same ranks (parallel folding): ETP takes TP's place and EP
takes CP's and part of DP's: reshape(pp, expert_dp, ep, etp). So attention runs on TP x CP x DP x PP
and experts on ETP x EP x EDP x PP, and EP need not divide DP.

This module is the only holder of global parallel state (besides the RNG tracker). Components do not
read it: `get_process_groups()` returns this rank's groups as one `ProcessGroups` object, which the
driver hands to the model, DDP, optimizer, pipeline and data code. The getters below (megatron-core's
names) remain for launchers, tools and tests.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite import collectives
from megatron_lite.config import check_parallel_sizes
from megatron_lite.pipeline.layout import check_virtual_stages
from megatron_lite.process_groups import Group, ProcessGroups

_ORDER = ("tp", "cp", "ep", "dp", "pp")  # fastest-varying first

# name -> (group for this rank, list of its ranks); filled by initialize_model_parallel.
_GROUPS: dict[str, tuple[Optional[dist.ProcessGroup], list[int]]] = {}
# every group created, by name, as a list of rank lists (for the self-check table and tests)
_ALL_GROUP_RANKS: dict[str, list[list[int]]] = {}
_PG_CACHE: dict[tuple[int, ...], object] = {}  # rank list -> ProcessGroup (each created once)
_VIRTUAL_PP_SIZE: Optional[int] = None
_VIRTUAL_PP_RANK: Optional[int] = None
_PROCESS_GROUPS: Optional[ProcessGroups] = None


def rank_groups(world_size: int, sizes: dict[str, int], dims: tuple[str, ...],
                order: tuple[str, ...] = _ORDER) -> list[list[int]]:
    """All groups of ranks that differ only along `dims`, for a grid laid out in `order` (fastest first).

    Pure function (no torch.distributed): used by initialize_model_parallel and by tests/self-checks.
    """
    shape = [sizes.get(name, 1) for name in order]
    if int(np.prod(shape)) != world_size:
        raise ValueError(f"parallel sizes {dict(zip(order, shape))} multiply to {int(np.prod(shape))}, not world size {world_size}")
    # numpy is row-major (last axis fastest), so reverse the order to make order[0] the fastest axis.
    grid = np.arange(world_size).reshape(shape[::-1])
    axes = list(order[::-1])
    kept = [axes.index(d) for d in axes if d not in dims]
    grouped = [axes.index(d) for d in axes if d in dims]
    group_size = int(np.prod([grid.shape[a] for a in grouped])) if grouped else 1
    return grid.transpose(kept + grouped).reshape(-1, group_size).tolist()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: Optional[str] = None, timeout_minutes: float = 10.0) -> None:
    """Initialise torch.distributed from the launcher's environment (torchrun/Slurm) if not done yet.

    With CUDA the device is chosen from LOCAL_RANK before the process group exists (NCCL needs it).
    """
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:  # a plain `python script.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    timeout = timedelta(minutes=timeout_minutes)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        store, rank, world = attempt_store(attempt, timeout)
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world)
    collectives.set_timeout(timeout_minutes)


def attempt_store(attempt: str, timeout: timedelta):
    """The launcher's key-value store (env:// rendezvous: MASTER_ADDR/MASTER_PORT), namespaced by torchrun's
    attempt number. torchrun --max-restarts hands every attempt the same agent store; without a prefix the
    restarted ranks read the dead attempt's gloo/NCCL addresses and fail in connectFullMesh or hang."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"megatron_lite/attempt_{attempt}/", store), rank, world


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None,
                              context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                              expert_tensor_parallel_size: Optional[int] = None) -> None:
    """Create every parallel group. Must be called on all ranks with the same arguments."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call parallel_state.init_distributed() first.")
    if _GROUPS:
        raise RuntimeError("model parallel groups are already initialised: call destroy_model_parallel() first.")
    world = dist.get_world_size()
    tp, pp, cp, ep = (tensor_model_parallel_size, pipeline_model_parallel_size,
                      context_parallel_size, expert_model_parallel_size)
    etp = expert_tensor_parallel_size or tp  # megatron-core's default: the dense TP size
    check_parallel_sizes(world, tp, pp, cp, ep, etp)  # config.py owns the rule
    if virtual_pipeline_model_parallel_size is not None and virtual_pipeline_model_parallel_size > 1:
        check_virtual_stages(virtual_pipeline_model_parallel_size * pp, pp, virtual_pipeline_model_parallel_size)
    dp = world // (tp * pp * cp)
    dense = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
    expert = {"tp": etp, "cp": 1, "ep": ep, "dp": world // (etp * pp * ep), "pp": pp}

    specs = {  # group name -> (sizes, dims), following megatron-core's tokens
        "tp": (dense, ("tp",)),
        "cp": (dense, ("cp",)),
        "dp": (dense, ("dp",)),
        "dp_cp": (dense, ("dp", "cp")),
        "pp": (dense, ("pp",)),
        "mp": (dense, ("tp", "pp")),
        "tp_cp": (dense, ("tp", "cp")),
        "tp_dp": (dense, ("tp", "dp")),
        "tp_dp_cp": (dense, ("tp", "dp", "cp")),
        "ep": (expert, ("ep",)),
        "expert_dp": (expert, ("dp",)),
        "tp_ep": (expert, ("tp", "ep")),  # ETP x EP: where a layer's tokens are dispatched
        "etp": (expert, ("tp",)),
        "tp_ep_pp": (expert, ("tp", "ep", "pp")),  # every expert shard once: the expert grad norm
    }
    rank = dist.get_rank()
    for name, (sizes, dims) in specs.items():
        _make_groups(name, rank_groups(world, sizes, dims), rank)
    # Embedding group: first and last stage of each pipeline (tied word embeddings); position
    # embedding group: first stage only.
    pipelines = _ALL_GROUP_RANKS["pp"]
    _make_groups("embd", [sorted({ranks[0], ranks[-1]}) for ranks in pipelines], rank)
    _make_groups("pos_embd", [[ranks[0]] for ranks in pipelines], rank)

    global _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK
    _VIRTUAL_PP_SIZE = virtual_pipeline_model_parallel_size
    _VIRTUAL_PP_RANK = 0 if virtual_pipeline_model_parallel_size is not None else None


def _make_groups(name: str, groups: list[list[int]], rank: int) -> None:
    """Create every group of one kind. new_group is collective over the world, so every rank creates
    every group in the same order; a rank list seen before (e.g. dp_cp == dp when CP = 1) reuses its group."""
    _ALL_GROUP_RANKS[name] = groups
    for ranks in groups:
        key = tuple(ranks)
        if key not in _PG_CACHE:
            _PG_CACHE[key] = dist.new_group(ranks)
        if rank in ranks:
            group = _PG_CACHE[key]
            _GROUPS[name] = (group, ranks)
            collectives.register_group_name(group, name)


def model_parallel_is_initialized() -> bool:
    return bool(_GROUPS)


def _group(name: str):
    if name not in _GROUPS:
        if name in _ALL_GROUP_RANKS:
            raise RuntimeError(f"rank {dist.get_rank()} is not a member of any '{name}' group "
                               "(e.g. a middle pipeline stage has no embedding group).")
        raise RuntimeError(f"parallel group '{name}' is not initialised: call initialize_model_parallel() first.")
    return _GROUPS[name][0]


def _ranks(name: str) -> list[int]:
    _group(name)
    return _GROUPS[name][1]


def group_name(group) -> str:
    """The name ('tp', 'dp', ...) of a group made here; 'world' for the default group."""
    return collectives.group_name(group)


def _group_object(name: str) -> Optional[Group]:
    if name not in _GROUPS:
        return None
    handle, ranks = _GROUPS[name]
    # Groups with the same members share one communicator and one name in the byte accounting (with CP = 1,
    # 'dp_cp' is the 'dp' group), so a Group is named after its communicator.
    return Group(collectives.group_name(handle), tuple(ranks), ranks.index(dist.get_rank()), handle)


def get_process_groups() -> ProcessGroups:
    """This rank's groups as the object handed to every component (built once per initialisation)."""
    global _PROCESS_GROUPS
    if not _GROUPS:
        raise RuntimeError("model parallel groups are not initialised: call initialize_model_parallel() first.")
    if _PROCESS_GROUPS is None:
        world = Group("world", tuple(range(dist.get_world_size())), dist.get_rank(), None)
        fields = {name: _group_object(name) for name in ("tp", "pp", "dp", "dp_cp", "cp", "mp", "tp_cp", "tp_dp",
                                                          "tp_dp_cp", "ep", "expert_dp", "tp_ep", "etp", "tp_ep_pp")}
        _PROCESS_GROUPS = ProcessGroups(world=world, embd=_group_object("embd"), vp_size=_VIRTUAL_PP_SIZE, **fields)
    return _PROCESS_GROUPS


def group_ranks(name: str) -> list[int]:
    """Global ranks of this rank's group `name` ('tp', 'pp', 'dp', 'dp_cp', 'cp', 'mp', 'embd', 'ep', ...);
    empty when the rank belongs to no group of that kind (middle stages and 'embd')."""
    if name in _ALL_GROUP_RANKS and name not in _GROUPS:
        return []
    return list(_ranks(name))


def all_group_ranks() -> dict[str, list[list[int]]]:
    """Every group of every kind, as lists of global ranks (what the self-check prints)."""
    return {name: [list(r) for r in groups] for name, groups in _ALL_GROUP_RANKS.items()}


# ---- getters with megatron-core's names ----------------------------------------------------------
def get_tensor_model_parallel_group():
    return _group("tp")


def get_tensor_model_parallel_world_size() -> int:
    return len(_ranks("tp")) if _GROUPS else 1


def get_tensor_model_parallel_rank() -> int:
    return _ranks("tp").index(dist.get_rank()) if _GROUPS else 0


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (the one that reads data and broadcasts it)."""
    return _ranks("tp")[0]


def get_pipeline_model_parallel_group():
    return _group("pp")


def get_pipeline_model_parallel_world_size() -> int:
    return len(_ranks("pp")) if _GROUPS else 1


def get_pipeline_model_parallel_rank() -> int:
    return _ranks("pp").index(dist.get_rank()) if _GROUPS else 0


def get_pipeline_model_parallel_prev_rank() -> int:
    ranks = _ranks("pp")
    return ranks[(ranks.index(dist.get_rank()) - 1) % len(ranks)]


def get_pipeline_model_parallel_next_rank() -> int:
    ranks = _ranks("pp")
    return ranks[(ranks.index(dist.get_rank()) + 1) % len(ranks)]


def get_pipeline_model_parallel_first_rank() -> int:
    return _ranks("pp")[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return _ranks("pp")[-1]


def get_data_parallel_group(with_context_parallel: bool = False):
    return _group("dp_cp" if with_context_parallel else "dp")


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return len(_ranks("dp_cp" if with_context_parallel else "dp")) if _GROUPS else 1


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    if not _GROUPS:
        return 0
    return _ranks("dp_cp" if with_context_parallel else "dp").index(dist.get_rank())


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    return _ranks("dp_cp" if with_context_parallel else "dp")[0]


def get_context_parallel_group():
    return _group("cp")


def get_context_parallel_world_size() -> int:
    return len(_ranks("cp")) if _GROUPS else 1


def get_context_parallel_rank() -> int:
    return _ranks("cp").index(dist.get_rank()) if _GROUPS else 0


def get_model_parallel_group():
    return _group("mp")


def get_tensor_and_data_parallel_group(with_context_parallel: bool = True):
    return _group("tp_dp_cp" if with_context_parallel else "tp_dp")


def get_embedding_group():
    return _group("embd")


def get_position_embedding_group():
    return _group("pos_embd")


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    if "embd" not in _GROUPS:
        return False
    if ignore_virtual:
        return True
    return is_pipeline_first_stage() or is_pipeline_last_stage()


def get_expert_model_parallel_group():
    return _group("ep")


def get_expert_model_parallel_world_size() -> int:
    return len(_ranks("ep")) if _GROUPS else 1


def get_expert_model_parallel_rank() -> int:
    return _ranks("ep").index(dist.get_rank()) if _GROUPS else 0


def get_expert_data_parallel_group():
    return _group("expert_dp")


def get_expert_tensor_parallel_group():
    return _group("etp")


def get_expert_tensor_parallel_world_size() -> int:
    return len(_ranks("etp")) if _GROUPS else 1


# ---- virtual pipeline ----------------------------------------------------------------------------
def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _VIRTUAL_PP_SIZE


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VIRTUAL_PP_RANK


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    global _VIRTUAL_PP_RANK
    _VIRTUAL_PP_RANK = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the first pipeline stage; with virtual stages, only for model chunk 0."""
    if not ignore_virtual and _VIRTUAL_PP_SIZE is not None and _VIRTUAL_PP_RANK != 0:
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the last pipeline stage; with virtual stages, only for the last model chunk."""
    if not ignore_virtual and _VIRTUAL_PP_SIZE is not None and _VIRTUAL_PP_RANK != _VIRTUAL_PP_SIZE - 1:
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def destroy_model_parallel() -> None:
    """Forget every group (and destroy their communicators) so initialize_model_parallel can run again."""
    global _VIRTUAL_PP_SIZE, _VIRTUAL_PP_RANK, _PROCESS_GROUPS
    for group in _PG_CACHE.values():
        if group not in (None, dist.GroupMember.WORLD, dist.GroupMember.NON_GROUP_MEMBER):
            dist.destroy_process_group(group)
    _PG_CACHE.clear()
    _GROUPS.clear()
    _ALL_GROUP_RANKS.clear()
    collectives.forget_group_names()
    _VIRTUAL_PP_SIZE = None
    _VIRTUAL_PP_RANK = None
    _PROCESS_GROUPS = None
