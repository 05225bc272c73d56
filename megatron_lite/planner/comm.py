"""Communication time from bytes: which link a group uses, and ring-collective costs.

Placement: parallel_state lays ranks out in megatron-core's order tp-cp-ep-dp-pp (TP fastest), and
torchrun fills nodes with consecutive ranks, so a group stays inside one node exactly when all its ranks
share rank // gpus_per_node. `group_span` asks parallel_state.rank_groups for the group's first instance
(every instance has the same shape) rather than re-deriving the order.

Costs (Thakur, Rabenseifner & Gropp 2005; NCCL's ring algorithms), for n ranks, B the bytes that
collectives.py counts for the op (the tensor for all_reduce, the gathered output for all_gather, the
unreduced input for reduce_scatter, the input for all_to_all), bw the per-rank link bandwidth:
  all_reduce     2 (n-1)/n B / bw + 2 (n-1) alpha
  all_gather, reduce_scatter, all_to_all    (n-1)/n B / bw + (n-1) alpha
  p2p            B / bw + alpha
A group that crosses nodes runs at the inter-node bandwidth (its slowest hop). A calibrated profile
(cpu) gives latency and bus bandwidth per group size instead.
"""
from __future__ import annotations

import functools

from megatron_lite.planner.hardware import Hardware
from megatron_lite.planner.layout import Layout

FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0}


@functools.lru_cache(maxsize=65536)
def group_span(layout: Layout, dims: tuple, gpus_per_node: int) -> int:
    """How many nodes one group along `dims` (parallel_state names: tp, cp, ep, dp, pp) spans."""
    world = layout.world
    sizes = {"tp": layout.tp, "cp": layout.cp, "dp": layout.dp, "pp": layout.pp, "ep": 1}
    if max(sizes[d] for d in dims) == 1 and len(dims) == 1:
        return 1
    # EP folds over DP x CP in megatron-core: the grid with EP uses dp / ep in the dp slot
    if "ep" in dims and layout.ep > 1:
        sizes["ep"], sizes["dp"] = layout.ep, layout.dp * layout.cp // layout.ep
        sizes["cp"] = 1
    group = _first_group(world, tuple(sorted(sizes.items())), dims)
    return len({rank // gpus_per_node for rank in group})


@functools.lru_cache(maxsize=65536)
def _first_group(world: int, sizes: tuple, dims: tuple) -> tuple:
    from megatron_lite.parallel_state import rank_groups
    return tuple(rank_groups(world, dict(sizes), dims)[0])


def collective_time(hw: Hardware, op: str, nbytes: float, n: int, nodes: int, count: int = 1) -> float:
    """Seconds for `count` collectives (e.g. one per DDP bucket) moving nbytes in all over n ranks spanning
    `nodes` nodes: the bandwidth term once for all the bytes, the latency term per collective."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = (n - 1) * (2 if op == "all_reduce" else 1) * max(1, count)
    if hw.collective_table:
        latency, bandwidth = _interpolate_group(hw, n)
    elif nodes > 1:
        latency, bandwidth = hw.inter_node_latency_s, hw.inter_node_bandwidth_gbps
    else:
        latency, bandwidth = hw.intra_node_latency_s, hw.intra_node_bandwidth_gbps
    return FACTOR[op] * (n - 1) / n * nbytes / (bandwidth * 1e9) + steps * latency


def p2p_time(hw: Hardware, nbytes: float, crosses_node: bool, pipeline: bool = False) -> float:
    """One transfer of nbytes; pipeline: a hop between pipeline stages (its own transport within a node)."""
    if nbytes <= 0:
        return 0.0
    if pipeline and hw.pipeline_p2p and not crosses_node:
        latency, bandwidth = hw.pipeline_p2p
    elif hw.p2p:
        latency, bandwidth = hw.p2p
    elif crosses_node:
        latency, bandwidth = hw.inter_node_latency_s, hw.inter_node_bandwidth_gbps
    else:
        latency, bandwidth = hw.intra_node_latency_s, hw.intra_node_bandwidth_gbps
    return nbytes / (bandwidth * 1e9) + latency


def _interpolate_group(hw: Hardware, n: int) -> tuple[float, float]:
    """Measured (latency per step, bandwidth) for group size n: the nearest measured size."""
    sizes = sorted(int(k) for k in hw.collective_table)
    nearest = min(sizes, key=lambda s: (abs(s - n), s))
    latency, bandwidth = hw.collective_table[str(nearest)]
    return latency, bandwidth
