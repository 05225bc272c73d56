"""Plan the parallel layout of a GPT run: predicted memory and step time of every valid layout, best first.

    python tools/plan_parallel.py --num-layers 96 --hidden-size 12288 --num-attention-heads 96 \\
        --seq-length 2048 --vocab-size 51200 --bf16 --global-batch-size 1536 \\
        --num-gpus 1024 --gpus-per-node 8 --hardware a100-80gb --top 5 --output-json plans.json
    python tools/plan_parallel.py --config model.yaml --num-gpus 64 --hardware h100-80gb --evaluate \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 --sequence-parallel
    python tools/plan_parallel.py --calibrate --hardware-profile cpu.json       # measure this machine
    python tools/plan_parallel.py ... --hardware-profile cpu.json --num-gpus 8 --gpus-per-node 8
    python tools/plan_parallel.py ... --evaluate <the run's layout flags> --check-against metrics.jsonl

The model is given by pretrain_gpt.py's own flags (or --config FILE.yaml), the cluster by --num-gpus,
--gpus-per-node and --hardware (a100-80gb, h100-80gb, h200-141gb, cpu) or --hardware-profile (a JSON
written by --calibrate), with --gpu-memory-gb, --peak-tflops, --intra-node-bandwidth-gbps and
--inter-node-bandwidth-gbps (GB/s per GPU and direction) overriding the preset. Without --evaluate every
valid layout is searched (megatron_lite/planner/search.py) and the --top K are printed as a table and
written to --output-json as a list of plans, best first. --evaluate predicts the layout the layout flags
give instead. --check-against METRICS.jsonl compares a run's start-up {"record": "memory"} line (the
logging rank: last pipeline stage, first TP and DP rank) with the prediction for the same layout (pass
the run's flags), exactly for params, grads, main params and optimizer states, within 10% for
activations (measured when the run had --measure-activation-memory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_lite import arguments  # noqa: E402
from megatron_lite.config import ConfigError  # noqa: E402
from megatron_lite.planner import report  # noqa: E402
from megatron_lite.planner.hardware import NAMES, get_hardware  # noqa: E402


def planner_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("planner (tools/plan_parallel.py)")
    group.add_argument("--num-gpus", type=int, default=None, help="GPUs (ranks) to plan for.")
    group.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (a group inside one node uses the intra-node link).")
    group.add_argument("--hardware", default="h100-80gb", help=f"Hardware preset: {', '.join(NAMES)}.")
    group.add_argument("--hardware-profile", default=None, help="A profile JSON written by --calibrate (instead of --hardware).")
    group.add_argument("--calibrate", action="store_true", help="Measure this machine (GEMM rate, memory bandwidth, gloo collectives per group size, p2p) and write --hardware-profile PATH.")
    group.add_argument("--calibrate-ranks", type=int, default=8, help="Processes the collective calibration runs.")
    group.add_argument("--gpu-memory-gb", type=float, default=None, help="Override the device memory (GB).")
    group.add_argument("--intra-node-bandwidth-gbps", type=float, default=None, help="Override the intra-node bandwidth (GB/s per GPU, each way).")
    group.add_argument("--inter-node-bandwidth-gbps", type=float, default=None, help="Override the inter-node bandwidth (GB/s per GPU, each way).")
    group.add_argument("--top", type=int, default=5, help="Plans to print and write.")
    group.add_argument("--output-json", default=None, help="Write the plans (a list, best first) to this file.")
    group.add_argument("--evaluate", action="store_true", help="Predict the layout given by the layout flags instead of searching.")
    group.add_argument("--check-against", default=None, metavar="METRICS.jsonl", help="Compare a run's start-up memory record with the prediction for its layout (implies --evaluate).")
    if "--num-experts" not in parser._option_string_actions:  # until the MoE layers land in config.py
        group.add_argument("--num-experts", type=int, default=None, help="MoE: experts per layer (planning only).")
        group.add_argument("--moe-router-topk", type=int, default=2, help="MoE: experts per token (planning only).")
    return parser


def main(argv=None) -> int:
    parser = planner_args(arguments.build_parser())
    parser.description = __doc__.split("\n\n")[0]
    args_ns = parser.parse_args(argv)
    extra = vars(args_ns)
    try:
        if extra["calibrate"]:
            return _calibrate(extra)
        num_gpus = extra["num_gpus"]
        if num_gpus is None:
            raise ConfigError("--num-gpus: give the number of GPUs to plan for.")
        cfg = arguments.parse(argv, world_size=num_gpus, extra_args_provider=planner_args, validate=False)
        hw = get_hardware(extra["hardware"], extra["hardware_profile"], memory_gb=extra["gpu_memory_gb"],
                          peak_tflops=cfg.logging.peak_tflops,
                          intra_node_bandwidth_gbps=extra["intra_node_bandwidth_gbps"],
                          inter_node_bandwidth_gbps=extra["inter_node_bandwidth_gbps"])
        if extra["evaluate"] or extra["check_against"]:
            return _evaluate(cfg, hw, extra)
        return _search(cfg, hw, extra)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _calibrate(extra: dict) -> int:
    from megatron_lite.planner.calibrate import calibrate
    from megatron_lite.planner.hardware import Hardware
    path = extra["hardware_profile"]
    if not path:
        raise ConfigError("--calibrate: give --hardware-profile PATH to write the profile to.")
    hw = Hardware.from_json(calibrate(world=extra["calibrate_ranks"]))
    with open(path, "w") as fh:
        json.dump(hw.to_json(), fh, indent=1)
    print(f"wrote {path}: peak {hw.peak_tflops:.4f} TFLOP/s per rank (1 thread), memory bandwidth "
          f"{hw.memory_bandwidth_gbps:.1f} GB/s, collectives {hw.collective_table}, p2p {hw.p2p}")
    return 0


def _search(cfg, hw, extra: dict) -> int:
    import time
    from megatron_lite.planner.search import fits_nowhere_message, search
    start = time.time()
    result = search(cfg, extra["num_gpus"], extra["gpus_per_node"], hw, top=extra["top"])
    if not result.plans:
        raise ConfigError(fits_nowhere_message(result, hw, extra["num_gpus"]))
    print(f"{result.considered} layouts considered ({result.pruned_by_memory} pruned by memory) in "
          f"{time.time() - start:.1f} s; {extra['num_gpus']} x {hw.name}, {extra['gpus_per_node']} per node")
    print(report.table(result.plans))
    best = result.plans[0]
    print(report.memory_lines(best))
    print("flags: " + " ".join(best["flags"]))
    if extra["output_json"]:
        report.write_json(extra["output_json"], result.plans)
    return 0


def _evaluate(cfg, hw, extra: dict) -> int:
    from megatron_lite.planner.layout import layout_of, prepare
    from megatron_lite.planner.predict import evaluate
    from megatron_lite.planner.states import rank_state_bytes
    config = prepare(cfg)
    config.validate()  # the layout must be one pretrain_gpt.py accepts
    layout = layout_of(config)
    plan = evaluate(cfg, layout, hw, extra["gpus_per_node"], overlap=config.parallel.overlap_grad_reduce)
    print(report.table([plan]))
    print(report.memory_lines(plan))
    if extra["output_json"]:
        report.write_json(extra["output_json"], [plan])
    if extra["check_against"]:
        record = report.read_memory_record(extra["check_against"])
        plan["_exact_last_stage"] = rank_state_bytes(cfg, layout, layout.pp - 1, 0)
        rows, ok = report.check_against(plan, record)
        print("\n".join(rows))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
