"""The planner's outputs: the ranked console table, the JSON file, and --check-against (a run's start-up
memory record beside the prediction for the same rank)."""
from __future__ import annotations

import json

from megatron_lite.planner.layout import describe, layout_from_plan

GIB = 2 ** 30


def table(plans: list) -> str:
    header = (f"{'#':>2} {'layout':<22} {'SP':<3} {'mbs':>3} {'recompute':<9} {'sharding':<18} {'sched':<11} "
              f"{'mem GB':>7} {'step s':>9} {'TFLOP/s':>8} {'MFU':>6}  breakdown (s): compute tp cp ep dp bubble")
    lines = [header, "-" * len(header)]
    for i, p in enumerate(plans, 1):
        b = p["step_time_breakdown_s"]
        lines.append(
            f"{i:>2} {describe(layout_from_plan(p)):<22} {'on' if p['sequence_parallel'] else 'off':<3} "
            f"{p['micro_batch_size']:>3} {p['recompute_granularity']:<9} {p['data_parallel_sharding_strategy']:<18} "
            f"{p['schedule']:<11} {p['memory_per_gpu_gb']:>7.2f} {p['step_time_s']:>9.4g} {p['tflops_per_gpu']:>8.2f} "
            f"{p['mfu']:>6.1%}  {b['compute']:.3g} {b['tp_comm']:.3g} {b['cp_comm']:.3g} {b['ep_comm']:.3g} "
            f"{b['dp_comm_exposed']:.3g} {b['pipeline_bubble']:.3g}")
    return "\n".join(lines)


def memory_lines(plan: dict) -> str:
    m = plan["memory_breakdown_gb"]
    return "memory per GPU (GB): " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()) + \
        f"; total {plan['memory_per_gpu_gb']:.3f}"


def write_json(path: str, plans: list) -> None:
    with open(path, "w") as fh:
        json.dump(plans, fh, indent=1)


def read_memory_record(path: str) -> dict:
    with open(path) as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("record") == "memory":
                return record
    raise ValueError(f"--check-against {path}: no {{\"record\": \"memory\"}} line (run with --metrics-jsonl and "
                     "without --no-log-memory).")


def check_against(plan: dict, record: dict) -> tuple[list[str], bool]:
    """Rows comparing the logging rank's measured bytes (last pipeline stage, first TP and DP rank) with
    the prediction for that stage; True when states match exactly and activations within 10%."""
    stage = next(s for s in plan["memory_per_stage_gb"] if s["pp_rank"] == plan["pipeline_model_parallel_size"] - 1)
    exact = plan.get("_exact_last_stage", {})
    rows, ok = [f"{'kind':<18} {'predicted':>14} {'measured':>14}  verdict"], True
    for key in ("params", "grads", "main_params", "optimizer_states"):
        predicted = exact.get(key, stage[key] * 1e9)
        same = int(round(predicted)) == int(record[key])
        ok &= same
        rows.append(f"{key:<18} {int(round(predicted)):>14d} {int(record[key]):>14d}  {'exact' if same else 'DIFFERS'}")
    if record.get("activations") is not None:
        predicted = stage["activations"] * 1e9
        error = abs(predicted - record["activations"]) / max(1.0, record["activations"])
        ok &= error <= 0.10
        rows.append(f"{'activations':<18} {int(predicted):>14d} {int(record['activations']):>14d}  "
                    f"{error:.1%} {'(within 10%)' if error <= 0.10 else '(over 10%)'}")
    else:
        rows.append("activations: not in the record (run with --measure-activation-memory)")
    return rows, ok
