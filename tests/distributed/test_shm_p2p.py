"""pipeline/shm_p2p.py: same-host pipeline p2p through shared memory delivers exactly what gloo's p2p
delivers (order, content, dtype, counted bytes), including when a channel has more messages in flight than
slots, and fails like gloo does: a dead sender or a timeout raises the error that names the op and group."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_lite import collectives as C
from megatron_lite import parallel_state as ps
from megatron_lite.errors import ConfigError
from megatron_lite.pipeline import p2p, shm_p2p
from megatron_lite.testing import run_distributed

SHAPE = (3, 2, 5)


def _message(src: int, dst: int, direction: str, index: int, dtype: torch.dtype) -> torch.Tensor:
    seed = 1000 * src + 100 * dst + 10 * index + (direction == "grad")
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _exchange(groups, transport, dtype: torch.dtype, n: int) -> dict:
    """n activations to the next rank and n gradients to the previous one, every receive posted before any
    send, waited for in reverse order; what arrived, checked against what was sent."""
    pp = groups.pp
    me, nxt, prv = pp.rank, (pp.rank + 1) % pp.size, (pp.rank - 1) % pp.size
    kw = dict(shape=SHAPE, dtype=dtype, device=torch.device("cpu"), groups=groups, transport=transport)
    recvs = p2p.post_ops([(f"a{i}", None, prv, "act") for i in range(n)] +
                         [(f"g{i}", None, nxt, "grad") for i in range(n)], **kw)
    sends = p2p.post_ops([(f"sa{i}", _message(me, nxt, "act", i, dtype), nxt, "act") for i in range(n)] +
                         [(f"sg{i}", _message(me, prv, "grad", i, dtype), prv, "grad") for i in range(n)], **kw)
    for i in range(n):
        assert sends.wait(f"sa{i}") is None and sends.wait(f"sg{i}") is None
    wrong = []
    for i in reversed(range(n)):
        got_act, got_grad = recvs.wait(f"a{i}"), recvs.wait(f"g{i}")
        if got_act.dtype != dtype or not torch.equal(got_act, _message(prv, me, "act", i, dtype)):
            wrong.append(f"act {i}")
        if not torch.equal(got_grad, _message(nxt, me, "grad", i, dtype)):
            wrong.append(f"grad {i}")
    return {"wrong": wrong}


def _transport_worker(slots: int) -> dict:
    shm_p2p.MAX_SLOTS = slots
    ps.initialize_model_parallel(1, dist.get_world_size())
    groups = ps.get_process_groups()
    out = {"left": [], "wrong": {}, "bytes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        transport = shm_p2p.connect(groups, SHAPE, dtype, torch.device("cpu"), "shm")
        assert transport is not None
        C.barrier(groups.pp)  # every rank has unlinked its files
        out["left"] += [f for f in os.listdir(shm_p2p.SHM_DIR) if f.startswith(transport.name)]
        for name, tr in (("shm", transport), ("process-group", None)):
            C.reset_comm_stats()
            out["wrong"][(str(dtype), name)] = _exchange(groups, tr, dtype, n=5)["wrong"]
            out["bytes"][(str(dtype), name)] = (C.bytes_for("send"), C.bytes_for("recv"))
    # a second connect for the same group, shape and dtype reuses the channels (no collective)
    out["cached"] = shm_p2p.connect(groups, SHAPE, torch.float32, torch.device("cpu"), "auto") is not None
    # tensors off the CPU: auto falls back to the process group's p2p, shm says why it cannot
    out["meta_auto"] = shm_p2p.connect(groups, SHAPE, torch.float32, torch.device("meta"), "auto")
    try:
        shm_p2p.connect(groups, (7,), torch.float32, torch.device("meta"), "shm")
        out["meta_shm"] = None
    except ConfigError as error:
        out["meta_shm"] = str(error)
    # ranks that do not share a host (or its /dev/shm and pids: another container): the same, with the reason
    shm_p2p._host_id = lambda: f"host{dist.get_rank()}"
    out["hosts_auto"] = shm_p2p.connect(groups, (9,), torch.float32, torch.device("cpu"), "auto")
    try:
        shm_p2p.connect(groups, (11,), torch.float32, torch.device("cpu"), "shm")
        out["hosts_shm"] = None
    except ConfigError as error:
        out["hosts_shm"] = str(error)
    return out


@pytest.mark.parametrize("slots", [32, 1])
def test_shm_p2p_delivers_what_gloo_delivers(slots):
    # slots 1: every channel has 5 messages in flight, so 4 wait in the backlog for the flusher thread
    for rank, out in enumerate(run_distributed(_transport_worker, world_size=3, slots=slots)):
        assert out["left"] == [], f"rank {rank}: files left in /dev/shm: {out['left']}"
        for key, wrong in out["wrong"].items():
            assert wrong == [], f"rank {rank} {key}: messages differ from what was sent: {wrong}"
        for dtype in ("torch.float32", "torch.bfloat16"):
            assert out["bytes"][(dtype, "shm")] == out["bytes"][(dtype, "process-group")], out["bytes"]
            size = 2 if "bfloat16" in dtype else 4
            assert out["bytes"][(dtype, "shm")] == (10 * 30 * size,) * 2
        assert out["cached"]
        assert out["meta_auto"] is None
        assert "--pipeline-p2p-transport shm" in out["meta_shm"] and "not on the CPU" in out["meta_shm"]
        assert out["hosts_auto"] is None
        assert "spans several hosts" in out["hosts_shm"] and "--pipeline-p2p-transport auto" in out["hosts_shm"]


def _failure_worker(case: str):
    ps.initialize_model_parallel(1, 2)
    groups = ps.get_process_groups()
    transport = shm_p2p.connect(groups, SHAPE, torch.float32, torch.device("cpu"), "auto")
    if groups.pp.rank == 1:
        if case == "timeout":
            time.sleep(4)  # alive, but never sends
        return None  # "exit": the process ends without sending
    if case == "timeout":
        C.set_timeout(1.5 / 60)
    posted = p2p.post_ops([("a", None, 1, "act")], shape=SHAPE, dtype=torch.float32, device=torch.device("cpu"),
                          groups=groups, transport=transport)
    start = time.monotonic()
    try:
        posted.wait("a")
    except (C.CollectivePeerLostError, C.CollectiveTimeoutError) as error:
        return type(error).__name__, str(error), time.monotonic() - start
    return None


@pytest.mark.parametrize("case,expected", [("exit", "CollectivePeerLostError"), ("timeout", "CollectiveTimeoutError")])
def test_shm_p2p_failures_name_the_op(case, expected):
    kind, message, seconds = run_distributed(_failure_worker, world_size=2, case=case)[0]
    assert kind == expected, message
    assert "recv on group 'pp'" in message and "rank 0" in message, message
    assert seconds < 30, f"took {seconds:.1f} s to notice"
