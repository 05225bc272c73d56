"""Pipeline schedules as data, checked in one process: order, matching sends/receives, deadlock freedom,
in-flight bounds, the simulator's bubble against theory, stage assignment and refusal of bad layouts."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_lite.config import Config, ConfigError
from megatron_lite.pipeline.runner import get_forward_backward_func
from megatron_lite.pipeline.actions import Backward, Exchange, FinalizeGrads, Forward, P2POp, Post, Wait, WeightGrad
from megatron_lite.pipeline.schedules import all_rank_schedules, build_schedule, schedule_name, schedule_table
from megatron_lite.pipeline.simulator import ScheduleError, check_schedules, max_in_flight, simulate, simulate_timeline
from megatron_lite.pipeline.stages import layers_for_stage, stage_layer_counts


def layouts():
    for pp in (2, 3, 4, 8):
        for m in range(1, 3 * pp + 2):
            yield "gpipe", pp, 1, m
            yield "1f1b", pp, 1, m
            yield "zb-h1", pp, 1, m
            if pp <= 4 or m in (1, 2 * pp - 1, 3 * pp + 1):  # any m (fewer at PP 8: the simulator's cost)
                yield "zbv", pp, 2, m
            for v in (2, 3):
                if m >= pp:  # any m >= the micro-batch group size (default PP)
                    yield "interleaved", pp, v, m


@pytest.mark.parametrize("forward_only", [False, True])
def test_every_schedule_is_sound_matched_and_deadlock_free(forward_only):
    count = 0
    for name, pp, v, m in layouts():
        schedules = all_rank_schedules(name, pp, v, m, forward_only)
        check_schedules(schedules, v, m, forward_only)  # raises ScheduleError with the reason
        count += 1
    assert count > 100


def test_in_flight_bounds():
    for name, pp, v, m in layouts():
        for rank, actions in enumerate(all_rank_schedules(name, pp, v, m)):
            peak = max_in_flight(actions)
            if name == "1f1b":
                assert peak == min(pp - rank, m), (pp, rank, m)
            elif name == "gpipe":
                assert peak == m
            elif name == "zb-h1":  # W's held back r steps on rank r: 1F1B's peak (rank 0's) on every rank
                assert peak == min(pp, m), (pp, rank, m)
            elif name == "zbv":  # 2 PP chunks of half a stage: 1F1B's activation memory, on every rank once m >= 2 PP - 1
                assert peak <= 2 * min(pp, m) and (peak == 2 * pp or m < 2 * pp - 1), (pp, rank, m, peak)
            else:  # Megatron's warm-up count (G = the largest micro-batch group) plus the one in the steady state
                largest_group = pp + m % pp
                warmup = v * m if m == pp else min(2 * (pp - rank - 1) + (v - 1) * largest_group, v * m)
                assert peak == min(warmup + 1, v * m), (pp, v, rank, m)


def test_sync_grads_only_on_each_chunks_last_backward_and_finalize_once():
    for name, pp, v, m in [("1f1b", 4, 1, 6), ("interleaved", 2, 3, 4), ("gpipe", 2, 1, 3)]:
        for actions in all_rank_schedules(name, pp, v, m):
            backwards = [a for a in actions if isinstance(a, Backward)]
            synced = [a for a in backwards if a.sync_grads]
            assert sorted(a.chunk for a in synced) == list(range(v))
            for a in synced:
                assert a is [b for b in backwards if b.chunk == a.chunk][-1]
            assert isinstance(actions[-1], FinalizeGrads) and sum(isinstance(a, FinalizeGrads) for a in actions) == 1


def test_no_pipelining_is_gradient_accumulation():
    actions = build_schedule("no_pipelining", 1, 0, 1, 3)
    assert actions == [Forward(0, 0), Backward(0, 0), Forward(0, 1), Backward(0, 1), Forward(0, 2),
                       Backward(0, 2, sync_grads=True), FinalizeGrads()]


def test_1f1b_reads_like_the_paper():
    # PP = 4, rank 1, 6 micro-batches: 2 warm-up forwards, 4 steady 1F1B pairs, 2 cool-down backwards.
    compute = [("F" if isinstance(a, Forward) else "B", a.microbatch)
               for a in build_schedule("1f1b", 4, 1, 1, 6) if isinstance(a, (Forward, Backward))]
    assert compute == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("F", 4), ("B", 2),
                       ("F", 5), ("B", 3), ("B", 4), ("B", 5)]
    # the steady state batches the send of a result with the receive from the other direction
    exchanges = [tuple(op.kind for op in a.ops) for a in build_schedule("1f1b", 4, 1, 1, 6) if isinstance(a, Exchange)]
    assert ("send_forward", "recv_backward") in exchanges and ("send_backward", "recv_forward") in exchanges


def test_interleaved_order_matches_megatron():
    # PP = 2, VP = 2, m = 4: forwards run chunk 0 on micro-batches 0, 1, chunk 1 on 0, 1, then 2, 3 likewise.
    actions = build_schedule("interleaved", 2, 0, 2, 4)
    forwards = [(a.chunk, a.microbatch) for a in actions if isinstance(a, Forward)]
    assert forwards == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    backwards = [(a.chunk, a.microbatch) for a in actions if isinstance(a, Backward)]
    assert backwards == [(1, 0), (1, 1), (0, 0), (0, 1), (1, 2), (1, 3), (0, 2), (0, 3)]
    # rank 0 warms up with 2 (pp - 1) + (v - 1) pp = 4 forwards before its first backward
    kinds = [type(a).__name__ for a in actions if isinstance(a, (Forward, Backward))]
    assert kinds[:5] == ["Forward"] * 4 + ["Forward"] and kinds[5] == "Backward"


@pytest.mark.parametrize("pp", [2, 4])
def test_simulated_bubble_equals_theory(pp):
    for m in (pp, 2 * pp, 16):
        for name in ("1f1b", "gpipe"):
            idle = simulate(all_rank_schedules(name, pp, 1, m), forward_time=1.0, backward_time=1.0)
            assert idle == pytest.approx([(pp - 1) / (m + pp - 1)] * pp), (name, m)
        # unequal forward/backward times: the bubble is still (p - 1)(f + b) over the step
        timeline = simulate_timeline(all_rank_schedules("1f1b", pp, 1, m), 1.0, 2.0)
        assert timeline.step_time == pytest.approx((m + pp - 1) * 3.0)
        for v in (2, 4):
            # a chunk has 1/v of a stage's layers; interleaving divides the bubble by v
            idle = simulate(all_rank_schedules("interleaved", pp, v, m), forward_time=1.0 / v, backward_time=1.0 / v)
            assert idle == pytest.approx([(pp - 1) / (v * m + pp - 1)] * pp), (v, m)


def test_interleaving_with_any_microbatch_count_and_group_size():
    # Megatron's --microbatch-group-size-per-virtual-pipeline-stage: groups of G micro-batches per chunk; the
    # remainder of m / G joins the last group (every group keeps >= PP micro-batches)
    assert schedule_table(5, 2, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (4, 0), (2, 1), (3, 1), (4, 1)]
    assert schedule_table(4, 2, 4) == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]
    count = 0
    for pp in (2, 3, 4):
        for v in (2, 3):
            for group in range(pp, 2 * pp + 2):
                for m in range(group, 3 * pp + 3):
                    for forward_only in (False, True):
                        schedules = all_rank_schedules("interleaved", pp, v, m, forward_only, group)
                        check_schedules(schedules, v, m, forward_only)
                        count += 1
    assert count > 300
    # a larger group keeps the bubble but holds more micro-batches in flight (a longer warm-up)
    big, default = all_rank_schedules("interleaved", 4, 2, 8, group_size=8), all_rank_schedules("interleaved", 4, 2, 8)
    assert simulate(big) == pytest.approx(simulate(default))
    assert max_in_flight(big[0]) == 2 * 3 + 8 + 1 > max_in_flight(default[0]) == 2 * 3 + 4 + 1
    # m not a multiple of PP: the bubble sits between those of the neighbouring multiples
    idle = {m: max(simulate(all_rank_schedules("interleaved", 4, 2, m), 0.5, 0.5)) for m in (8, 10, 12)}
    assert idle[8] > idle[10] > idle[12]


@pytest.mark.parametrize("forward_only", [False, True])
def test_overlapped_p2p_is_sound_deadlock_free_and_never_slower(forward_only):
    count = 0
    for name, pp, v, m in layouts():
        blocking = all_rank_schedules(name, pp, v, m, forward_only)
        overlapped = all_rank_schedules(name, pp, v, m, forward_only, overlap=True)
        assert not any(isinstance(a, Exchange) for actions in overlapped for a in actions)
        # same compute order, only the communication changes
        compute = [[a for a in actions if isinstance(a, (Forward, Backward, FinalizeGrads))] for actions in blocking]
        assert compute == [[a for a in actions if isinstance(a, (Forward, Backward, FinalizeGrads))] for actions in overlapped]
        for p2p_time in (0.0, 0.25):
            slow = check_schedules(blocking, v, m, forward_only) if p2p_time == 0 else simulate_timeline(blocking, p2p_time=p2p_time)
            fast = simulate_timeline(overlapped, p2p_time=p2p_time)
            assert fast.step_time <= slow.step_time + 1e-9, (name, pp, v, m, p2p_time)
        check_schedules(overlapped, v, m, forward_only)
        for actions in overlapped:  # one hand-off to the comm thread per gap between computations
            gaps = "".join("P" if isinstance(a, Post) else "W" if isinstance(a, Wait) else "|" for a in actions).split("|")
            assert all(gap in ("", "P", "W", "PW") for gap in gaps), (name, pp, v, m, gaps)
        count += 1
    assert count > 100


def test_overlap_hides_transfer_time():
    # with a transfer cost, posting early hides it behind compute: 1F1B PP 4 m 8, transfer = 1/4 forward
    for name, v in (("1f1b", 1), ("interleaved", 2)):
        blocking = simulate_timeline(all_rank_schedules(name, 4, v, 8), p2p_time=0.25).step_time
        overlapped = simulate_timeline(all_rank_schedules(name, 4, v, 8, overlap=True), p2p_time=0.25).step_time
        ideal = simulate_timeline(all_rank_schedules(name, 4, v, 8)).step_time
        assert ideal < overlapped < blocking, name
    # 1F1B rank 1: the receive of the next input is posted before the current forward runs
    actions = build_schedule("1f1b", 4, 1, 1, 6, overlap=True)
    first_forward = actions.index(Forward(0, 1))
    post = next(i for i, a in enumerate(actions) if isinstance(a, Post) and P2POp("recv_forward", 0, 2) in a.ops)
    wait = next(i for i, a in enumerate(actions) if isinstance(a, Wait) and P2POp("recv_forward", 0, 2) in a.ops)
    assert post < first_forward < wait < actions.index(Forward(0, 2))


def test_simulator_catches_bad_posts_and_waits():
    actions = build_schedule("1f1b", 2, 0, 1, 2, overlap=True)
    waits = [i for i, a in enumerate(actions) if isinstance(a, Wait)]
    with pytest.raises(ScheduleError, match="never waited"):  # a posted op left in flight
        check_schedules([actions[:waits[-1]] + actions[waits[-1] + 1:], build_schedule("1f1b", 2, 1, 1, 2, overlap=True)], 1, 2)
    early = [Wait(actions[waits[0]].ops)] + actions
    with pytest.raises(ScheduleError, match="not posted"):
        check_schedules([early, build_schedule("1f1b", 2, 1, 1, 2, overlap=True)], 1, 2)
    # a receive waited for after the forward that needs it
    rank1 = build_schedule("1f1b", 2, 1, 1, 2, overlap=True)
    index = rank1.index(Forward(0, 0))
    moved = rank1[:index - 1] + [rank1[index], rank1[index - 1]] + rank1[index + 1:]
    with pytest.raises(ScheduleError, match="before its recv_forward"):
        check_schedules([actions, moved], 1, 2)


@pytest.mark.parametrize("f,b,w", [(1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (2.0, 2.0, 1.0)])
def test_zb_h1_bubble_is_the_papers(f, b, w):
    # Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 3: 1F1B idles (p - 1)(F + B + W) per rank,
    # ZB-H1 (p - 1)(F + B - W); with posted (overlapped) p2p the simulator gives exactly that
    for pp in (2, 4, 8):
        for m in (pp, 2 * pp + 1, 16):
            zb = simulate_timeline(all_rank_schedules("zb-h1", pp, 1, m, overlap=True), f, b + w, weight_time=w)
            assert zb.step_time == pytest.approx(m * (f + b + w) + (pp - 1) * (f + b - w)), (pp, m)
            one_f_one_b = simulate_timeline(all_rank_schedules("1f1b", pp, 1, m, overlap=True), f, b + w)
            assert one_f_one_b.step_time == pytest.approx(m * (f + b + w) + (pp - 1) * (f + b + w)), (pp, m)
            # blocking exchanges couple neighbours: still below 1F1B
            blocking = simulate_timeline(all_rank_schedules("zb-h1", pp, 1, m), f, b + w, weight_time=w)
            assert zb.step_time <= blocking.step_time < one_f_one_b.step_time


@pytest.mark.parametrize("overlap", [False, True])
def test_zbv_bubble_is_the_papers_zero_up_to_the_fill(overlap):
    # Qi et al. 2024, section 6 (and the V schedules of "Pipeline Parallelism with Controllable Memory"): at
    # T_F = T_B = T_W ZB-V has no bubble besides the pipeline fill. The fill is unavoidable: rank PP - 1's
    # first chunk can start only after PP - 1 chunk forwards (T_F / 2 each), so no schedule finishes before
    # m (T_F + T_B + T_W) + (PP - 1) T_F / 2, and ZB-V reaches that bound on every rank: (PP - 1) T_F / 2 idle,
    # a sixth of 1F1B's (PP - 1)(T_F + T_B + T_W) and half of ZB-H1's (PP - 1)(T_F + T_B - T_W).
    t = 1.0  # T_F = T_B = T_W per stage; a chunk holds half a stage
    for pp in (2, 3, 4, 8):
        for m in (2 * pp - 1, 2 * pp, 2 * pp + 1, 16):
            timeline = simulate_timeline(all_rank_schedules("zbv", pp, 2, m, overlap=overlap), t / 2, t, weight_time=t / 2)
            assert timeline.step_time == pytest.approx(3 * m * t + (pp - 1) * t / 2), (pp, m)
            assert [timeline.step_time - busy for busy in timeline.busy] == pytest.approx([(pp - 1) * t / 2] * pp)
            zb_h1 = simulate_timeline(all_rank_schedules("zb-h1", pp, 1, m, overlap=True), t, 2 * t, weight_time=t)
            assert zb_h1.step_time - 3 * m * t == pytest.approx(2 * (pp - 1) * t / 2)
        # fewer micro-batches than the pattern's 2 PP - 1: the missing ones are left out, still sound
        for m in range(1, 2 * pp - 1):
            check_schedules(all_rank_schedules("zbv", pp, 2, m, overlap=overlap), 2, m)


def test_zbv_places_chunks_as_a_v_and_refuses_what_it_cannot_run():
    from megatron_lite.pipeline.actions import op_peer, virtual_stage
    assert [virtual_stage(4, r, c, v_shape=True) for c in (0, 1) for r in range(4)] == [0, 1, 2, 3, 7, 6, 5, 4]
    assert layers_for_stage(8, 2, 0, 2, 1, v_shape=True) == [6, 7] and layers_for_stage(8, 2, 1, 2, 1, v_shape=True) == [4, 5]
    # rank PP - 1 hands chunk 0's output to its own chunk 1 (no message), rank 0 computes the loss
    actions = build_schedule("zbv", 4, 3, 2, 8)
    turn = [op for a in actions if isinstance(a, Exchange) for op in a.ops if op_peer(op, 4, 3) == 3]
    assert {op.kind for op in turn} == {"send_forward", "recv_forward", "send_backward", "recv_backward"}
    backwards = [a for a in actions if isinstance(a, Backward)]
    assert all(a.defer_wgrad for a in backwards) and sum(isinstance(a, WeightGrad) for a in actions) == 16
    # rank 0's order: 2 PP - 1 forwards of chunk 0, then F1 B1 W1 (its first backward is the loss's)
    rank0 = [type(a).__name__[0] + str(a.chunk) for a in build_schedule("zbv", 4, 0, 2, 8) if isinstance(a, (Forward, Backward, WeightGrad))]
    assert rank0[:10] == ["F0"] * 7 + ["F1", "B1", "W1"]
    with pytest.raises(ConfigError, match="--pipeline-schedule zbv: needs exactly two model chunks per rank"):
        build_schedule("zbv", 4, 0, 1, 8)
    with pytest.raises(ConfigError, match="--pipeline-schedule zbv: needs exactly two model chunks per rank"):
        schedule_name(4, 3, "zbv")
    with pytest.raises(ConfigError, match="--pipeline-schedule zbv: needs --pipeline-model-parallel-size >= 2"):
        schedule_name(1, 2, "zbv")


def test_zb_h1_splits_every_backward_and_refuses_what_it_cannot_run():
    actions = build_schedule("zb-h1", 4, 1, 1, 6)
    backwards = [a for a in actions if isinstance(a, Backward)]
    weights = [a for a in actions if isinstance(a, WeightGrad)]
    assert all(a.defer_wgrad for a in backwards) and [a.microbatch for a in weights] == list(range(6))
    assert [a.sync_grads for a in weights] == [False] * 5 + [True] and backwards[-1].sync_grads
    # rank 1 runs each W one step after its B; the held-back one after its last B
    compute = [type(a).__name__[0] + str(a.microbatch) for a in actions if isinstance(a, (Forward, Backward, WeightGrad))]
    assert compute[:8] == ["F0", "F1", "F2", "B0", "F3", "B1", "W0", "F4"] and compute[-3:] == ["B5", "W4", "W5"]
    # forward-only is 1F1B's forward-only list
    assert build_schedule("zb-h1", 4, 1, 1, 6, forward_only=True) == build_schedule("1f1b", 4, 1, 1, 6, forward_only=True)
    with pytest.raises(ConfigError, match="--pipeline-schedule zb-h1: does not support virtual stages"):
        schedule_name(2, 2, "zb-h1")
    with pytest.raises(ConfigError, match="zb-h1: needs --pipeline-model-parallel-size > 1"):
        schedule_name(1, 1, "zb-h1")
    with pytest.raises(ConfigError, match="zb-h1: does not support virtual stages"):
        build_schedule("zb-h1", 2, 0, 2, 4)
    # a W without its deferred B is refused by the simulator
    broken = [build_schedule("zb-h1", 2, 0, 1, 2), build_schedule("zb-h1", 2, 1, 1, 2)]
    broken[1] = [Backward(a.chunk, a.microbatch, a.sync_grads) if isinstance(a, Backward) else a for a in broken[1]]
    with pytest.raises(ScheduleError, match="without a preceding Backward"):
        check_schedules(broken, 1, 2)


def test_simulator_catches_broken_schedules():
    schedules = all_rank_schedules("1f1b", 2, 1, 4)
    # rank 1 receives micro-batches out of order -> mismatch
    swapped = [list(s) for s in schedules]

    def relabel(index: int, microbatch: int) -> None:
        ops = tuple(dataclasses.replace(op, microbatch=microbatch) if op.kind == "recv_forward" else op
                    for op in swapped[1][index].ops)
        swapped[1][index] = Exchange(ops)

    receives = [i for i, a in enumerate(swapped[1]) if isinstance(a, Exchange) and any(op.kind == "recv_forward" for op in a.ops)]
    relabel(receives[0], 1)
    relabel(receives[1], 0)
    with pytest.raises(ScheduleError, match="mismatch|before"):
        check_schedules(swapped, 1, 4)
    # rank 0 waits for a gradient before sending the activation that produces it -> deadlock
    deadlocked = [list(s) for s in schedules]
    deadlocked[0].insert(0, Exchange((build_schedule("1f1b", 2, 0, 1, 4)[3].ops[-1],)))
    with pytest.raises(ScheduleError):
        simulate_timeline(deadlocked)


def test_layers_for_stage_covers_every_layer_once():
    for num_layers, pp, vp, first, last in [(8, 2, None, None, None), (8, 4, 2, None, None), (12, 2, 3, None, None),
                                            (10, 4, None, 1, 3), (7, 3, None, 1, None), (9, 3, None, None, 1)]:
        seen = []
        for rank in range(pp):
            for chunk in range(vp or 1):
                layers = layers_for_stage(num_layers, pp, rank, vp, chunk, first, last)
                assert layers == list(range(layers[0], layers[-1] + 1))
                if vp:  # chunk v on rank r holds virtual stage v x pp + r
                    assert layers[0] == (chunk * pp + rank) * (num_layers // (pp * vp))
                seen += layers
        assert sorted(seen) == list(range(num_layers))
    assert stage_layer_counts(10, 4, 1, 3) == [1, 3, 3, 3]
    assert layers_for_stage(8, 2, 1, 2, 1) == [6, 7]


def _config(**parallel) -> Config:
    cfg = Config(world_size=parallel.pop("world_size", 4))
    cfg.model.num_layers = parallel.pop("num_layers", 8)
    cfg.training.global_batch_size = parallel.pop("global_batch_size", None)
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize("kwargs,message", [
    (dict(pipeline_model_parallel_size=3, world_size=3), "not divisible by --pipeline-model-parallel-size 3"),
    (dict(pipeline_model_parallel_size=1, num_layers_per_virtual_pipeline_stage=2), "needs --pipeline-model-parallel-size > 1"),
    (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2, world_size=2, global_batch_size=1,
          pipeline_schedule="interleaved"), "at least --microbatch-group-size-per-virtual-pipeline-stage 2"),
    (dict(pipeline_model_parallel_size=2, world_size=2, pipeline_schedule="zbv"),
     "--pipeline-schedule zbv: needs exactly two model chunks per rank"),
    (dict(pipeline_model_parallel_size=2, world_size=2, num_layers_per_virtual_pipeline_stage=1, pipeline_schedule="zbv"),
     "--pipeline-schedule zbv: needs exactly two model chunks per rank.*got 4"),
    (dict(pipeline_model_parallel_size=1, world_size=1, pipeline_schedule="zbv"), "--pipeline-schedule zbv: needs"),
    (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2, world_size=2, global_batch_size=4,
          microbatch_group_size_per_vp_stage=1), "--microbatch-group-size-per-virtual-pipeline-stage: 1 is smaller"),
    (dict(pipeline_model_parallel_size=2, world_size=2, num_layers_per_virtual_pipeline_stage=3), "not divisible by 3"),
    (dict(pipeline_model_parallel_size=4, num_layers=9, decoder_first_pipeline_num_layers=3, decoder_last_pipeline_num_layers=3), "do not divide"),
])
def test_invalid_layouts_refused_by_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _config(**kwargs).validate()


def test_invalid_layouts_refused_by_the_pipeline_itself():
    with pytest.raises(ConfigError, match="at least --microbatch-group-size-per-virtual-pipeline-stage 4"):
        build_schedule("interleaved", 2, 0, 2, 3, group_size=4)
    with pytest.raises(ConfigError, match="PP > 1|> 1"):
        layers_for_stage(8, 1, 0, vp_size=2)
    with pytest.raises(ConfigError, match="not divisible"):
        layers_for_stage(6, 2, 0, vp_size=2)
    with pytest.raises(ConfigError, match="first/last"):
        layers_for_stage(9, 4, 0, first_stage_layers=3, last_stage_layers=3)
    with pytest.raises(ConfigError, match="needs PP = 1"):
        build_schedule("no_pipelining", 2, 0, 1, 4)
    with pytest.raises(ConfigError, match="does not support virtual stages"):
        schedule_name(2, 2, "gpipe")
    with pytest.raises(ConfigError, match="needs virtual stages"):
        schedule_name(2, 1, "interleaved")


def test_get_forward_backward_func_picks_the_schedule():
    assert get_forward_backward_func(_config(world_size=1).validate()).schedule == "no_pipelining"
    # auto: the smallest simulated bubble within 1F1B's memory: ZB-H1 without virtual stages
    assert get_forward_backward_func(_config(pipeline_model_parallel_size=2).validate()).schedule == "zb-h1"
    assert get_forward_backward_func(_config(pipeline_model_parallel_size=2, pipeline_schedule="1f1b").validate()).schedule == "1f1b"
    assert get_forward_backward_func(_config(pipeline_model_parallel_size=2, pipeline_schedule="gpipe").validate()).schedule == "gpipe"
    cfg = _config(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2, global_batch_size=4).validate()
    assert get_forward_backward_func(cfg).schedule == "zbv"  # auto with two chunks per rank
    cfg = _config(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1, global_batch_size=4).validate()
    assert get_forward_backward_func(cfg).schedule == "interleaved"  # four chunks per rank


def test_auto_picks_the_smallest_bubble_within_1f1b_memory():
    from megatron_lite.pipeline.auto import choose_schedule, describe, predict
    for pp in (2, 4, 8):
        for m in (1, pp, 2 * pp + 1, 16):
            for overlap in (False, True):
                choice = choose_schedule(pp, 1, m, overlap=overlap)
                assert choice.name == "zb-h1" and choice.peak_in_flight <= min(pp, m), (pp, m)
                assert all(bubble > choice.bubble for _, bubble, _ in choice.rejected)
                gpipe = dict((name, peak) for name, _, peak in choice.rejected)["gpipe"]
                assert gpipe == m  # GPipe holds every micro-batch: over the bound once m > PP
    assert choose_schedule(1, 1, 4).name == "no_pipelining"
    assert choose_schedule(4, 3, 6).name == "interleaved"  # the only one with three virtual stages
    for pp in (2, 4):  # two virtual stages: ZB-V beats interleaved in bubble and memory, and takes any m
        for m in (3, pp, 2 * pp + 1, 16):
            choice = choose_schedule(pp, 2, m)
            assert choice.name == "zbv" and choice.peak_in_flight <= 2 * min(pp, m), (pp, m)
            assert all(bubble > choice.bubble for _, bubble, _ in choice.rejected)
    assert choose_schedule(4, 2, 8, group_size=4).name == "interleaved"  # interleaving's own flag was given
    assert choose_schedule(4, 1, 8, "1f1b").name == "1f1b"
    assert predict("1f1b", 4, 1, 8) == (pytest.approx(3 * 3 / (8 * 3 + 3 * 3)), 4)  # (p-1)(F+B) over the step
    cfg = _config(pipeline_model_parallel_size=4, global_batch_size=8, world_size=4).validate()
    line = describe(cfg)
    assert line.startswith("zb-h1 (chosen by auto; predicted bubble 0.200") and "gpipe 0.273 (over 1F1B's memory)" in line
