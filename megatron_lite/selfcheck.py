"""Self-check of the parallel topology: `torchrun --nproc-per-node 8 -m megatron_lite.selfcheck`.

Builds the given layout (or, with --all-layouts, every TP x PP x CP x EP factorisation of the world
size), checks that each group communicates among exactly its members (an all-reduce of rank ids), and
prints which ranks share which group, in megatron-core's rank order (tp-cp-ep-dp-pp).
Without torchrun it starts the ranks itself on gloo: `python -m megatron_lite.selfcheck --world-size 8`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

from megatron_lite import collectives, parallel_state as ps

_KINDS = [("tp", "tensor"), ("cp", "context"), ("ep", "expert"), ("dp", "data"), ("dp_cp", "data+context"),
          ("pp", "pipeline"), ("mp", "model (tp x pp)"), ("embd", "embedding (first+last stage)")]


def _layouts(world: int):
    for tp, pp, cp, ep in itertools.product([d for d in range(1, world + 1) if world % d == 0], repeat=4):
        if world % (tp * pp * cp) == 0 and world % (tp * pp * ep) == 0:
            yield tp, pp, cp, ep


def group_problem(name: str, members: list[int], group, rank: int) -> str | None:
    """All-reduce this rank's number over `group`: the sum must be that of exactly its members."""
    total = collectives.all_reduce_scalar(float(rank), group=group)
    if total != float(sum(members)):
        return f"rank {rank}: group {name} {members} summed to {total}, expected {sum(members)}"
    return None


def check_layout(tp: int, pp: int, cp: int = 1, ep: int = 1, vp: int | None = None, verbose: bool = True) -> list[str]:
    """Initialise one layout on the running world, verify every group, return the printed lines (rank 0)."""
    ps.initialize_model_parallel(tp, pp, vp if pp > 1 else None, cp, ep)
    rank = torch.distributed.get_rank()
    problems = []
    getters = {"tp": ps.get_tensor_model_parallel_group, "cp": ps.get_context_parallel_group,
               "ep": ps.get_expert_model_parallel_group, "dp": ps.get_data_parallel_group,
               "dp_cp": lambda: ps.get_data_parallel_group(with_context_parallel=True),
               "pp": ps.get_pipeline_model_parallel_group, "mp": ps.get_model_parallel_group,
               "embd": ps.get_embedding_group}
    for name, getter in getters.items():
        members = ps.group_ranks(name)
        problem = group_problem(name, members, getter(), rank) if members else None
        if problem:
            problems.append(problem)
    all_problems = collectives.all_gather_object(problems)
    lines = []
    if rank == 0:
        world = torch.distributed.get_world_size()
        dp = world // (tp * pp * cp)
        lines.append(f"layout TP={tp} CP={cp} EP={ep} DP={dp} PP={pp}" + (f" VP={vp}" if vp else "") + f" on {world} ranks")
        groups = ps.all_group_ranks()
        for name, label in _KINDS:
            lines.append(f"  {label:<30} {' '.join(str(g) for g in groups[name])}")
        flat = [p for rank_problems in all_problems for p in rank_problems]
        lines.append("  check: every group all-reduced among exactly its members" if not flat else
                     "  FAILED:\n    " + "\n    ".join(flat))
        if verbose:
            print("\n".join(lines), flush=True)
    ps.destroy_model_parallel()
    if any(all_problems):
        raise SystemExit(1)
    return lines


def _run(args) -> None:
    ps.init_distributed(args.distributed_backend)
    _run_spawned(args)
    torch.distributed.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=2)
    parser.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=2)
    parser.add_argument("--context-parallel-size", "--cp", dest="cp", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", "--ep", dest="ep", type=int, default=1)
    parser.add_argument("--virtual-pipeline-model-parallel-size", "--vp", dest="vp", type=int, default=None)
    parser.add_argument("--all-layouts", action="store_true", help="check every factorisation of the world size")
    parser.add_argument("--world-size", type=int, default=8, help="ranks to start when not under torchrun")
    parser.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"])
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        _run(args)
        return
    from megatron_lite.testing import run_distributed
    args.distributed_backend = "gloo"
    run_distributed(_run_spawned, args.world_size, timeout=600, args=args)


def _run_spawned(args) -> None:
    """Check the requested layouts on an initialised world (torchrun or run_distributed)."""
    world = torch.distributed.get_world_size()
    layouts = list(_layouts(world)) if args.all_layouts else [(args.tp, args.pp, args.cp, args.ep)]
    for tp, pp, cp, ep in layouts:
        if world % (tp * pp * cp) or world % (tp * pp * ep):
            raise SystemExit(f"world size {world} is not divisible by TP x PP x CP = {tp * pp * cp} "
                             f"(and TP x PP x EP = {tp * pp * ep}); choose sizes that divide {world}.")
        check_layout(tp, pp, cp, ep, args.vp)
    if torch.distributed.get_rank() == 0:
        print(f"self-check passed: {len(layouts)} layout(s) on {world} ranks", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
