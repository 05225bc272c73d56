"""Group memberships equal megatron-core's for every factorisation of world sizes 1, 2, 4, 8."""
import itertools

import pytest
import torch.distributed as dist

from megatron_lite import parallel_state as ps
from megatron_lite.testing import DistributedTestError, run_distributed


def megatron_core_groups(world_size, tp, cp, ep, dp, pp, token):
    """megatron-core's RankGenerator algorithm (generate_masked_orthogonal_rank_groups), re-derived
    independently of parallel_state's numpy grid, as the reference."""
    order = ["tp", "cp", "ep", "dp", "pp"]
    sizes = {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp}
    parallel_size = [sizes[o] for o in order]
    mask = [o in token.split("-") for o in order]

    def prefix_product(values):
        out = [1]
        for v in values:
            out.append(out[-1] * v)
        return out

    def decompose(index, shape):
        stride = prefix_product(shape)
        return [(index // d) % s for s, d in zip(shape, stride)]

    masked_shape = [s for s, m in zip(parallel_size, mask) if m]
    unmasked_shape = [s for s, m in zip(parallel_size, mask) if not m]
    global_stride = prefix_product(parallel_size)
    masked_stride = [d for d, m in zip(global_stride, mask) if m]
    unmasked_stride = [d for d, m in zip(global_stride, mask) if not m]
    group_size = prefix_product(masked_shape)[-1]
    groups = []
    for group_index in range(world_size // group_size):
        g_idx = decompose(group_index, unmasked_shape)
        ranks = []
        for rank_in_group in range(group_size):
            r_idx = decompose(rank_in_group, masked_shape)
            ranks.append(sum(a * b for a, b in zip(r_idx, masked_stride)) + sum(a * b for a, b in zip(g_idx, unmasked_stride)))
        groups.append(ranks)
    return groups


def layouts(world):
    for tp, pp, cp in itertools.product([1, 2, 4, 8], repeat=3):
        if world % (tp * pp * cp) == 0:
            for ep in [1, 2, 4, 8]:
                if world % (tp * pp * ep) == 0:
                    yield tp, pp, cp, ep


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_groups_equal_megatron_core_for_every_factorisation(world):
    tokens = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp",), "pp": ("pp",), "tp-pp": ("tp", "pp"),
              "dp-cp": ("dp", "cp"), "tp-cp": ("tp", "cp"), "tp-dp-cp": ("tp", "dp", "cp")}
    count = 0
    for tp, pp, cp, ep in layouts(world):
        dp = world // (tp * pp * cp)
        dense = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
        for token, dims in tokens.items():
            assert ps.rank_groups(world, dense, dims) == megatron_core_groups(world, tp, cp, 1, dp, pp, token), (tp, pp, cp, token)
        expert_dp = world // (tp * pp * ep)
        expert = {"tp": tp, "cp": 1, "ep": ep, "dp": expert_dp, "pp": pp}
        for token, dims in {"ep": ("ep",), "dp": ("dp",), "tp-ep": ("tp", "ep")}.items():
            assert ps.rank_groups(world, expert, dims) == megatron_core_groups(world, tp, 1, ep, expert_dp, pp, token)
        count += 1
    assert count > 0


@pytest.mark.parametrize("world", [4, 8])
def test_expert_groups_with_their_own_tensor_parallel_size_equal_megatron_core(world):
    """Parallel folding: the expert grid (ETP, EP, EDP, PP) is megatron-core's expert RankGenerator
    ("tp-ep-dp-pp" with tp = ETP), whatever the dense TP is."""
    count = 0
    for etp, ep, pp in itertools.product([1, 2, 4], repeat=3):
        if world % (etp * ep * pp) != 0:
            continue
        edp = world // (etp * ep * pp)
        expert = {"tp": etp, "cp": 1, "ep": ep, "dp": edp, "pp": pp}
        for token, dims in {"tp": ("tp",), "ep": ("ep",), "dp": ("dp",), "tp-ep": ("tp", "ep"),
                            "tp-ep-pp": ("tp", "ep", "pp")}.items():
            assert ps.rank_groups(world, expert, dims) == megatron_core_groups(world, etp, 1, ep, edp, pp, token)
        count += 1
    assert count > 4


def test_megatron_docstring_example_16_gpus_tp2_pp4():
    # megatron-core's parallel_state docstring: 16 GPUs, TP=2, PP=4 -> DP=2.
    sizes = {"tp": 2, "cp": 1, "ep": 1, "dp": 2, "pp": 4}
    assert ps.rank_groups(16, sizes, ("tp",)) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert ps.rank_groups(16, sizes, ("pp",)) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert ps.rank_groups(16, sizes, ("dp",)) == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]


def _check_layout(tp, pp, cp, ep, vp):
    ps.initialize_model_parallel(tp, pp, vp, cp, ep)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {
        "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(), ps.group_ranks("tp")),
        "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(), ps.group_ranks("pp")),
        "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.group_ranks("dp")),
        "dp_cp": (ps.get_data_parallel_rank(with_context_parallel=True),
                  ps.get_data_parallel_world_size(with_context_parallel=True), ps.group_ranks("dp_cp")),
        "cp": (ps.get_context_parallel_rank(), ps.get_context_parallel_world_size(), ps.group_ranks("cp")),
        "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size(), ps.group_ranks("ep")),
        "embd": ps.group_ranks("embd"),
        "mp": ps.group_ranks("mp"),
        "first": ps.is_pipeline_first_stage(), "last": ps.is_pipeline_last_stage(),
    }
    # Each group really communicates among exactly its members.
    import torch
    from megatron_lite import collectives
    for name, getter in [("tp", ps.get_tensor_model_parallel_group), ("pp", ps.get_pipeline_model_parallel_group),
                         ("dp", ps.get_data_parallel_group), ("cp", ps.get_context_parallel_group),
                         ("embd", ps.get_embedding_group), ("ep", ps.get_expert_model_parallel_group)]:
        if name == "embd" and not ps.is_rank_in_embedding_group(ignore_virtual=True):
            continue
        value = torch.tensor([float(rank)])
        collectives.all_reduce(value, group=getter())
        out[f"sum_{name}"] = value.item()
    if vp is not None:
        seen = []
        for chunk in range(vp):
            ps.set_virtual_pipeline_model_parallel_rank(chunk)
            seen.append((ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()))
        out["virtual"] = seen
    ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("tp,pp,cp,ep,vp", [(2, 2, 1, 1, None), (2, 2, 1, 2, 2), (1, 4, 1, 1, 2), (2, 1, 2, 1, None),
                                            (1, 2, 2, 2, None), (8, 1, 1, 1, None)])
def test_groups_on_8_gloo_ranks(tp, pp, cp, ep, vp):
    world = 8
    results = run_distributed(_check_layout, world, tp=tp, pp=pp, cp=cp, ep=ep, vp=vp)
    dp = world // (tp * pp * cp)
    dense = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
    expert = {"tp": tp, "cp": 1, "ep": ep, "dp": world // (tp * pp * ep), "pp": pp}
    for rank, out in enumerate(results):
        for name, sizes, dims in [("tp", dense, ("tp",)), ("pp", dense, ("pp",)), ("dp", dense, ("dp",)),
                                  ("dp_cp", dense, ("dp", "cp")), ("cp", dense, ("cp",)), ("ep", expert, ("ep",))]:
            group = next(g for g in ps.rank_groups(world, sizes, dims) if rank in g)
            local_rank, size, ranks = out[name]
            assert ranks == group and size == len(group) and local_rank == group.index(rank), (name, rank)
            if name != "dp_cp":
                assert out[f"sum_{name}"] == float(sum(group)), (name, rank)
        pipeline = out["pp"][2]
        if rank in (pipeline[0], pipeline[-1]):
            assert out["embd"] == sorted({pipeline[0], pipeline[-1]})
            assert out["sum_embd"] == float(sum(out["embd"]))
        else:
            assert out["embd"] == [] and "sum_embd" not in out
        assert out["mp"] == next(g for g in ps.rank_groups(world, dense, ("tp", "pp")) if rank in g)
        if vp is None:
            assert out["first"] == (rank == pipeline[0]) and out["last"] == (rank == pipeline[-1])
        else:
            first_rank, last_rank = rank == pipeline[0], rank == pipeline[-1]
            assert out["virtual"] == [(first_rank and c == 0, last_rank and c == vp - 1) for c in range(vp)]


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    return dist.get_rank()


def _hang_on_rank_zero():
    if dist.get_rank() == 0:
        import time
        time.sleep(60)
    return 1


def test_harness_reports_tracebacks_and_hangs():
    with pytest.raises(DistributedTestError, match="boom on purpose"):
        run_distributed(_raise_on_rank_one, 2)
    with pytest.raises(DistributedTestError, match=r"ranks \[0\] did not finish"):
        run_distributed(_hang_on_rank_zero, 2, timeout=8)
