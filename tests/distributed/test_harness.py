"""megatron_lite.testing.run_distributed: failures are reported at once, name every rank's state, and a
hung collective's own error (CollectiveTimeoutError, naming op and group) reaches the test."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_lite import collectives
from megatron_lite.testing import DistributedTestError, run_distributed


def _silent_exit_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(0)  # exits "successfully" without a result
    return dist.get_rank()


def test_rank_exiting_without_a_result_is_caught_at_once():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"rank 1 .*\n.*exited with code 0 without reporting a result"):
        run_distributed(_silent_exit_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 20  # not the 60 s deadline


def _raise_while_others_wait():
    side = dist.new_group([1, 2])  # collective over the world: every rank creates it
    rank = dist.get_rank()
    if rank == 0:
        raise ValueError("boom on purpose")
    if rank == 1:
        collectives.all_reduce(torch.ones(1), group=side)  # rank 2 never joins
    time.sleep(60)


def test_first_error_names_ranks_still_running_and_their_collective():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_while_others_wait, 3, timeout=60)
    text = str(info.value)
    assert time.monotonic() - start < 30
    assert "rank 0 (first error)" in text and "boom on purpose" in text
    assert "ranks still running (killed)" in text
    assert "rank 1: running _raise_while_others_wait; blocked in all_reduce on group 'other' (ranks [1, 2])" in text
    rank_two = next(line for line in text.splitlines() if line.strip().startswith("rank 2:"))
    assert "running _raise_while_others_wait" in rank_two and "blocked" not in rank_two


def _hang_in_collective():
    if dist.get_rank() == 1:
        time.sleep(60)  # never joins
    collectives.all_reduce(torch.ones(1))
    return "no hang"


def test_hung_collective_reports_its_own_timeout_before_the_deadline():
    """The ranks' collective timeout is shorter than the parent's deadline, so the stuck rank's
    CollectiveTimeoutError (op, group, rank) is in the message, and the sleeping rank is named."""
    with pytest.raises(DistributedTestError) as info:
        # 20 s: the rank's 15 s collective timeout must fire before the parent's deadline even when the
        # ranks take seconds to start on a loaded machine (8 s failed with 5.7 s spent blocked)
        run_distributed(_hang_in_collective, 2, timeout=20)
    text = str(info.value)
    assert "CollectiveTimeoutError" in text and "all_reduce on group 'world'" in text and "on rank 0" in text
    assert "rank 1: running _hang_in_collective" in text
