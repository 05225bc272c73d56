"""collectives.py: results, per-(group, op) call and byte accounting, and timeouts that name the op."""
import pytest
import torch
import torch.distributed as dist

from megatron_lite import collectives as C
from megatron_lite import parallel_state as ps
from megatron_lite.testing import DistributedTestError, run_distributed


def _exercise():
    ps.initialize_model_parallel(tensor_model_parallel_size=2)  # world 4: TP 2 x DP 2
    rank = dist.get_rank()
    tp, dp = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    C.reset_comm_stats()
    out = {}
    x = torch.full((3, 5), float(rank))                         # 15 floats = 60 bytes
    C.all_reduce(x, group=tp)
    out["all_reduce"] = x[0, 0].item()
    gathered = C.all_gather(torch.full((2, 3), float(rank)), group=tp, dim=1)   # -> [2, 6]: 48 bytes
    out["all_gather"] = gathered[0].tolist()
    scattered = C.reduce_scatter(torch.arange(8.0).reshape(4, 2) * (rank + 1), group=dp, dim=0)  # 32 bytes in
    out["reduce_scatter"] = scattered.tolist()
    flat = torch.empty(4)
    C.all_gather_into_tensor(flat, torch.full((2,), float(rank)), group=dp).__class__  # sync: returns None
    out["all_gather_into_tensor"] = flat.tolist()
    handle = C.all_reduce(torch.ones(10), group=dp, async_op=True)   # 40 bytes
    handle.wait()
    a2a_out = torch.empty(4)
    C.all_to_all_single(a2a_out, torch.arange(4.0) + 10 * rank, group=dp)  # 16 bytes
    out["all_to_all"] = a2a_out.tolist()
    b = torch.tensor([float(rank)] * 4)                          # 16 bytes
    C.broadcast(b, src=ps.get_tensor_model_parallel_src_rank(), group=tp)
    out["broadcast"] = b[0].item()
    peer = rank ^ 1
    send, recv = torch.full((6,), float(rank)), torch.empty(6)  # 24 bytes each
    for h in C.batch_isend_irecv([C.P2P("send", send, peer), C.P2P("recv", recv, peer)]):
        h.wait()
    out["p2p"] = recv[0].item()
    out["stats"] = C.comm_stats()
    ps.destroy_model_parallel()
    return out


def test_results_and_byte_counts_on_4_ranks():
    results = run_distributed(_exercise, 4)
    for rank, out in enumerate(results):
        tp_group = [rank - rank % 2, rank - rank % 2 + 1]
        dp_group = [rank % 2, rank % 2 + 2]
        assert out["all_reduce"] == sum(tp_group)
        assert out["all_gather"] == [float(tp_group[0])] * 3 + [float(tp_group[1])] * 3
        total = torch.arange(8.0).reshape(4, 2) * sum(r + 1 for r in dp_group)
        assert out["reduce_scatter"] == total[2 * dp_group.index(rank): 2 * dp_group.index(rank) + 2].tolist()
        assert out["all_gather_into_tensor"] == [float(dp_group[0])] * 2 + [float(dp_group[1])] * 2
        assert out["broadcast"] == float(tp_group[0])
        me = dp_group.index(rank)  # chunk `me` of every dp peer's input, in peer order
        assert out["all_to_all"] == [2 * me + 10 * dp_group[0], 2 * me + 1 + 10 * dp_group[0],
                                     2 * me + 10 * dp_group[1], 2 * me + 1 + 10 * dp_group[1]]
        assert out["p2p"] == float(rank ^ 1)
        stats = out["stats"]
        assert stats[("tp", "all_reduce")] == {"calls": 1, "bytes": 60}
        assert stats[("tp", "all_gather")] == {"calls": 1, "bytes": 48}
        assert stats[("dp", "reduce_scatter")] == {"calls": 1, "bytes": 32}
        assert stats[("dp", "all_gather")] == {"calls": 1, "bytes": 16}
        assert stats[("dp", "all_reduce")] == {"calls": 1, "bytes": 40}
        assert stats[("tp", "broadcast")] == {"calls": 1, "bytes": 16}
        assert stats[("dp", "all_to_all")] == {"calls": 1, "bytes": 16}
        assert stats[("world", "send")] == {"calls": 1, "bytes": 24}
        assert stats[("world", "recv")] == {"calls": 1, "bytes": 24}


def _timeout():
    import datetime
    import time
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    # A short per-group timeout keeps the test fast: gloo honours the group's own timeout.
    fast = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    C.register_group_name(fast, "tp")
    if dist.get_rank() == 1:
        time.sleep(6)  # never joins in time
        return "slept"
    C.all_reduce(torch.ones(1), group=fast)
    return "no timeout"


def test_timeout_names_op_group_and_rank():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_timeout, 2, timeout=30)
    text = str(info.value)
    assert "CollectiveTimeoutError" in text and "all_reduce on group 'tp'" in text and "on rank 0" in text


def _two_threads_blocked():
    """The training thread and a second thread (as --overlap-p2p-comm's communication thread) each blocked
    in a call: in_flight names both, and each thread's exit clears only its own entry."""
    import threading
    ps.initialize_model_parallel()
    group = ps.get_data_parallel_group()
    release_worker, worker_in = threading.Event(), threading.Event()

    def worker():
        C._call("recv", group, lambda: (worker_in.set(), release_worker.wait(30)))
    thread = threading.Thread(target=worker)
    thread.start()
    worker_in.wait(30)
    seen = {}

    def blocked_main():
        seen["both"] = C.in_flight()
        release_worker.set()
        thread.join(30)
        seen["main_only"] = C.in_flight()
    C._call("all_reduce", group, blocked_main)
    seen["none"] = C.in_flight()
    return seen


def test_in_flight_reports_every_blocked_thread():
    (seen,) = run_distributed(_two_threads_blocked, 1)
    assert "recv on group" in seen["both"] and "all_reduce on group" in seen["both"], seen
    assert "recv" not in seen["main_only"] and "all_reduce on group" in seen["main_only"], seen
    assert seen["none"] is None
