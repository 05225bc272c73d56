"""The parallel layout planner: memory and time models checked against measurement, and a search.

Modules (each model in its own, with its formula and source):
  layout.py       a candidate layout, its Config and its pretrain_gpt.py flags
  states.py       params/grads/main params/optimizer states: optimizer.memory.memory_report on a meta build
  activations.py  Korthikanti et al. 2022 per layer, x the schedule's peak micro-batches in flight
  memory.py       the per-stage total with the buffer allowance
  compute.py      FLOPs (logging.py's count) over GEMMs at size-dependent rates
  comm.py         collective and p2p times from bytes over the link the group's placement implies
  timing.py       the step: compute, TP/CP/EP comm, simulated pipeline bubble, exposed DP comm
  hardware.py     presets (a100-80gb, h100-80gb, h200-141gb, cpu) and calibrated profiles
  calibrate.py    measuring this machine (--calibrate)
  predict.py      one layout's full prediction record
  search.py       every valid layout, pruned by memory first, ranked by time
  measure.py      measured activations (saved-tensor accounting) for the run's memory record
  report.py       the console table, the JSON, --check-against
  auto.py         pretrain_gpt.py --auto-parallel
"""
from megatron_lite.planner.hardware import Hardware, get_hardware
from megatron_lite.planner.layout import Layout, apply, flags
from megatron_lite.planner.predict import evaluate
from megatron_lite.planner.search import search

__all__ = ["Hardware", "Layout", "apply", "evaluate", "flags", "get_hardware", "search"]
