"""--pipeline-schedule auto: the schedule with the smallest simulated bubble among those the layout allows
and whose activation memory stays within 1F1B's bound (at most min(PP, m) micro-batches of a full stage's
layers in flight on any rank; a chunk of VP counts 1 / VP). The simulator prices forward : backward = 1 : 2
(B = W = 1 for split backwards) per stage, divided by VP per chunk, with the configuration's
--overlap-p2p-comm; ties go to the simpler schedule (earlier in CANDIDATES). With two virtual stages per
rank auto compares interleaved 1F1B with ZB-V (which then places the chunks as its V: layout.is_v_shape),
unless --microbatch-group-size-per-virtual-pipeline-stage (interleaving's setting) is given; with more
chunks, interleaved is the only one."""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Optional

from megatron_lite.errors import ConfigError
from megatron_lite.pipeline.schedules import all_rank_schedules, schedule_name
from megatron_lite.pipeline.simulator import max_in_flight, simulate

CANDIDATES = ("1f1b", "zb-h1", "gpipe")  # without virtual stages, simplest first
VIRTUAL_CANDIDATES = ("interleaved", "zbv")  # two virtual stages per rank
FORWARD, BACKWARD, WEIGHT = 1.0, 2.0, 1.0


@dataclass(frozen=True)
class Choice:
    name: str
    bubble: float                  # mean idle fraction of the step over ranks (simulated)
    peak_in_flight: int
    rejected: tuple[tuple[str, float, int], ...] = ()  # (name, bubble, peak in flight) of the others


def predict(name: str, pp_size: int, num_chunks: int, num_microbatches: int, overlap: bool = False,
            group_size: Optional[int] = None) -> tuple[float, int]:
    """(mean simulated idle fraction, peak micro-batches in flight) of one schedule."""
    schedules = all_rank_schedules(name, pp_size, num_chunks, num_microbatches, group_size=group_size, overlap=overlap)
    idle = simulate(schedules, FORWARD / num_chunks, BACKWARD / num_chunks, weight_time=WEIGHT / num_chunks)
    return sum(idle) / len(idle), max(max_in_flight(actions) for actions in schedules)


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments; the planner asks for each layout often
def choose_schedule(pp_size: int, num_chunks: int, num_microbatches: int, requested: str = "auto",
                    overlap: bool = False, group_size: Optional[int] = None) -> Choice:
    """The schedule to run; an explicit request is validated and predicted, 'auto' searches."""
    if requested != "auto" or pp_size == 1 or num_chunks > 2:
        name = schedule_name(pp_size, num_chunks, requested)
        return Choice(name, *predict(name, pp_size, num_chunks, num_microbatches, overlap, group_size))
    # an explicit --microbatch-group-size-per-virtual-pipeline-stage is interleaving's own setting
    candidates = CANDIDATES if num_chunks == 1 else VIRTUAL_CANDIDATES if group_size is None else ("interleaved",)
    options = []
    for name in candidates:
        try:
            options.append((name, *predict(name, pp_size, num_chunks, num_microbatches, overlap, group_size)))
        except ConfigError:  # e.g. interleaving with fewer micro-batches than its group size
            continue
    bound = min(pp_size, num_microbatches) * num_chunks
    allowed = [option for option in options if option[2] <= bound] or options[:1]
    best = min(allowed, key=lambda option: round(option[1], 9))  # min keeps the first of equals
    return Choice(best[0], best[1], best[2], tuple(option for option in options if option[0] != best[0]))


def resolve(config, num_microbatches: Optional[int] = None) -> Choice:
    """The configuration's schedule for num_microbatches (default: the configuration's first step's)."""
    p = config.parallel
    m = num_microbatches or getattr(config, "num_microbatches", None) or p.pipeline_model_parallel_size
    return choose_schedule(p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1, m,
                           p.pipeline_schedule, p.overlap_p2p_comm, p.microbatch_group_size_per_vp_stage)


def describe(config) -> str:
    """One start-up log line: the schedule, whether auto chose it, and its predicted bubble."""
    choice = resolve(config)
    how = "chosen by auto" if config.parallel.pipeline_schedule == "auto" else "requested"
    bound = min(config.parallel.pipeline_model_parallel_size, config.num_microbatches) * \
        (config.parallel.virtual_pipeline_model_parallel_size or 1)
    others = ", ".join(f"{name} {bubble:.3f}" + (" (over 1F1B's memory)" if peak > bound else "")
                       for name, bubble, peak in choice.rejected)
    vp = config.parallel.virtual_pipeline_model_parallel_size or 1
    unit = "micro-batches" if vp == 1 else f"chunk micro-batches (1/{vp} of a stage each)"
    return (f"{choice.name} ({how}; predicted bubble {choice.bubble:.3f} of the step at F:B:W = 1:1:1, "
            f"peak {choice.peak_in_flight} {unit} in flight" + (f"; others: {others}" if others else "") + ")")
