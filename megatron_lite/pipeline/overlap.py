"""--overlap-p2p-comm as a transformation of a schedule's action list: each blocking Exchange becomes
Post and Wait actions placed so that a transfer runs while the rank computes. The result is still data,
so the simulator checks it like any schedule (tests/unit/test_schedules.py)."""
from __future__ import annotations

from megatron_lite.pipeline.actions import (RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD, Action, Backward,
                                            Exchange, FinalizeGrads, Forward, P2POp, Post, Wait)


def overlap_p2p(actions: list[Action]) -> list[Action]:
    """--overlap-p2p-comm: the same schedule with every Exchange split into posts and waits.

    Sends are posted right after the compute that produces them (interleaved 1F1B's blocking exchange
    waits for the backward that follows a forward; posted, the forward's output leaves at once) and waited
    for once the next send in the same direction is posted (or at the end); receives are posted at the
    exchange before the preceding compute (so the transfer runs during that compute) and waited for just
    before the compute that consumes them. Between two computations there is then one Post and one Wait
    (coalesce_posts_and_waits). Every op is posted no later than in the blocking list and sends keep their
    order per channel; the simulator checks deadlock freedom and message order for every schedule
    (tests/unit/test_schedules.py).
    """
    early_recvs: dict[int, list[tuple[P2POp, ...]]] = {}  # action index (-1: the start) -> receives posted there
    consumer = {}  # compute key -> the receive it waits for
    producer_index = {}  # ("F"|"B", chunk, mb) -> index of that compute
    sends_after: dict[int, list[P2POp]] = {}  # compute index -> sends posted right after it
    last_exchange, exchange_before_compute = -1, -1
    for index, action in enumerate(actions):
        if isinstance(action, (Forward, Backward)):
            exchange_before_compute = last_exchange
            producer_index[("F" if isinstance(action, Forward) else "B", action.chunk, action.microbatch)] = index
        elif isinstance(action, Exchange):
            recvs = tuple(op for op in action.ops if op.kind in (RECV_FORWARD, RECV_BACKWARD))
            if recvs:
                early_recvs.setdefault(exchange_before_compute, []).append(recvs)
            for op in recvs:
                consumer[("F" if op.kind == RECV_FORWARD else "B", op.chunk, op.microbatch)] = op
            for op in action.ops:
                if op.kind in (SEND_FORWARD, SEND_BACKWARD):
                    source = ("F" if op.kind == SEND_FORWARD else "B", op.chunk, op.microbatch)
                    sends_after.setdefault(producer_index.get(source, index), []).append(op)
            last_exchange = index
    out: list[Action] = [Post(recvs) for recvs in early_recvs.get(-1, [])]
    unwaited_sends: dict[str, P2POp] = {}

    def post_sends(sends: list[P2POp]) -> None:
        for op in sends:  # one post per send, each after waiting for the previous one of its kind
            if op.kind in unwaited_sends:
                out.append(Wait((unwaited_sends.pop(op.kind),)))
            unwaited_sends[op.kind] = op
            out.append(Post((op,)))

    for index, action in enumerate(actions):
        if isinstance(action, Exchange):
            post_sends(sends_after.pop(index, []))  # a send whose producer this list does not hold
            out.extend(Post(ops) for ops in early_recvs.get(index, []))
            continue
        if isinstance(action, (Forward, Backward)):
            recv = consumer.get(("F" if isinstance(action, Forward) else "B", action.chunk, action.microbatch))
            if recv is not None:
                out.append(Wait((recv,)))
        if isinstance(action, FinalizeGrads) and unwaited_sends:
            out.append(Wait(tuple(unwaited_sends.values())))
            unwaited_sends.clear()
        out.append(action)
        post_sends(sends_after.pop(index, []))
    if unwaited_sends:
        out.append(Wait(tuple(unwaited_sends.values())))
    return coalesce_posts_and_waits(out)


def coalesce_posts_and_waits(actions: list[Action]) -> list[Action]:
    """Each run of Post and Wait actions between two computations as one Post of all its ops followed by
    one Wait of all its ops (each in their order in the run).

    Why: every Post is one hand-off to the communication thread and every action one pass of the runner's
    bookkeeping, and at PP 4 with virtual stages a rank exchanges up to four tensors per unit of compute,
    so a run like "wait for the previous send, post the next send, post a receive, wait for a receive"
    cost four round trips on the compute thread between two computations (issue 17: the overlapped
    interleaved PP 4 m 4 row idled 2.6 points above the simulator). Posting before waiting is safe: a Post
    never blocks, so moving it earlier only starts a transfer sooner (a send is posted after the compute
    that produces it all the same, since runs hold no compute); the posting order per channel, which
    message matching relies on, is kept; the previous send of a direction is now waited for just after
    the next one is posted rather than before (two sends in flight per direction for that moment, with
    separate buffers). The simulator re-checks the result (tests/unit/test_schedules.py)."""
    out: list[Action] = []
    posts: list[P2POp] = []
    waits: list[P2POp] = []

    def flush() -> None:
        if posts:
            out.append(Post(tuple(posts)))
        if waits:
            out.append(Wait(tuple(waits)))
        posts.clear()
        waits.clear()

    for action in actions:
        if isinstance(action, Post):
            posts.extend(action.ops)
        elif isinstance(action, Wait):
            waits.extend(action.ops)
        else:
            flush()
            out.append(action)
    flush()
    return out
