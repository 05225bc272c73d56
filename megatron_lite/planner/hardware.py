"""Hardware presets and calibrated profiles: what the time and memory models need of a machine.

Figures per GPU, with sources:
- a100-80gb: 312 dense bf16 TFLOP/s and 80 GB HBM2e at 2.0 TB/s (NVIDIA A100 datasheet, 2021; SXM4 80GB);
  NVLink 3 600 GB/s total per GPU = 300 GB/s each way (same datasheet); one 200 Gb/s HDR InfiniBand NIC
  per GPU = 25 GB/s (NVIDIA DGX A100 user guide: 8x ConnectX-6 200 Gb/s for 8 GPUs).
- h100-80gb: 989 dense bf16 TFLOP/s (the datasheet's 1,979 is with sparsity), 80 GB HBM3 at 3.35 TB/s,
  NVLink 4 900 GB/s = 450 GB/s each way (NVIDIA H100 datasheet, SXM5); one 400 Gb/s NDR NIC per GPU =
  50 GB/s (NVIDIA DGX H100 user guide: 8x ConnectX-7).
- h200-141gb: 989 dense bf16 TFLOP/s, 141 GB HBM3e at 4.8 TB/s, NVLink 4 900 GB/s (NVIDIA H200 datasheet,
  SXM); 400 Gb/s NDR per GPU (DGX H200 user guide).
GEMM efficiency (fraction of peak a GEMM of a given size reaches): large bf16 GEMMs reach ~80% of peak on
A100/H100 with cuBLAS (NVIDIA's "Matrix Multiplication Background User's Guide", and the ~250-280 TFLOP/s
measured for 8K GEMMs on A100), falling off for small dimensions: eff(M, N, K) = eff_max x prod over the
dimensions of d / (d + half_dim), half_dim = 64 (a dimension of 64 gets half the rate of a large one).
Collective latency per ring step: 5 us in a node, 10 us across nodes (NCCL's published ring latencies are
of that order; they matter only for small messages).
- cpu: this machine, measured by `calibrate.py` (tools/plan_parallel.py --calibrate writes the profile JSON
  that --hardware-profile reads); without a profile, a quick calibration runs once and is cached.

Bandwidths are in GB/s (10^9 bytes per second) per GPU and direction.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from megatron_lite.errors import ConfigError


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float            # dense 16-bit (fp32 on cpu) TFLOP/s per device
    memory_gb: float              # device memory, GB (10^9 bytes)
    memory_bandwidth_gbps: float  # device memory bandwidth, GB/s (element-wise ops, optimizer step)
    intra_node_bandwidth_gbps: float
    inter_node_bandwidth_gbps: float
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 10e-6
    eff_max: float = 0.8
    half_dim: float = 64.0
    # measured GEMM rate by size: [(cube root of M*N*K, TFLOP/s)], used instead of eff_max/half_dim if set
    gemm_table: tuple = ()
    # per group size: (latency s, bus bandwidth GB/s) of collectives, measured (cpu); empty: from the links
    collective_table: dict = field(default_factory=dict)
    p2p: tuple = ()  # (latency s, bandwidth GB/s), measured (gloo: context parallelism's ring)
    # (latency s, bandwidth GB/s) of a pipeline hop within a node as runs make it, measured (cpu: shared
    # memory, pipeline/shm_p2p.py); empty: p2p
    pipeline_p2p: tuple = ()
    compute_units_per_node: Optional[int] = None  # cpu: cores shared by the node's ranks (None: one per rank)
    # the framework's fixed host cost per transformer layer and per micro-batch (embedding, output layer and
    # loss at negligible size), forward + backward, measured (cpu): eager PyTorch's per-op cost, which at
    # small GEMMs exceeds the arithmetic; 0 on GPU presets, whose host launches run ahead of the device
    layer_overhead_s: float = 0.0
    microbatch_overhead_s: float = 0.0
    # measured (cpu): [(predicted arithmetic s of a layer's forward + backward, real / predicted)], see
    # calibrate.layer_scale_table; empty: 1
    layer_scale_table: tuple = ()
    # measured (cpu): the training step's host cost outside forward and backward (optimizer, DDP's gradient
    # finish, clipping, scheduler), per step and per transformer layer on the rank; 0 on GPU presets
    step_overhead_s: float = 0.0
    step_layer_overhead_s: float = 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["gemm_table"] = [list(x) for x in self.gemm_table]
        out["layer_scale_table"] = [list(x) for x in self.layer_scale_table]
        return out

    @classmethod
    def from_json(cls, values: dict) -> "Hardware":
        values = dict(values)
        values["gemm_table"] = tuple(tuple(x) for x in values.get("gemm_table", ()))
        values["layer_scale_table"] = tuple(tuple(x) for x in values.get("layer_scale_table", ()))
        values["p2p"] = tuple(values.get("p2p", ()))
        values["pipeline_p2p"] = tuple(values.get("pipeline_p2p", ()))
        values["collective_table"] = {str(k): tuple(v) for k, v in values.get("collective_table", {}).items()}
        return cls(**values)


PRESETS = {
    "a100-80gb": Hardware("a100-80gb", 312.0, 80.0, 2039.0, 300.0, 25.0),
    "h100-80gb": Hardware("h100-80gb", 989.0, 80.0, 3350.0, 450.0, 50.0),
    "h200-141gb": Hardware("h200-141gb", 989.0, 141.0, 4800.0, 450.0, 50.0),
}
NAMES = (*PRESETS, "cpu")
CPU_PROFILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "megatron_lite", "cpu_profile.json")


def get_hardware(name: Optional[str] = None, profile: Optional[str] = None, **overrides) -> Hardware:
    """A preset (or `profile`, a JSON written by --calibrate) with the non-None overrides applied."""
    if profile:
        if not os.path.exists(profile):
            raise ConfigError(f"--hardware-profile: no such file {profile!r}. Write one with "
                              "tools/plan_parallel.py --calibrate --hardware-profile PATH.")
        with open(profile) as fh:
            hw = Hardware.from_json(json.load(fh))
    elif name == "cpu":
        hw = cpu_profile()
    elif name in PRESETS:
        hw = PRESETS[name]
    else:
        raise ConfigError(f"--hardware: unknown hardware {name!r}. Use one of {', '.join(NAMES)}, or "
                          "--hardware-profile PATH (a profile written by --calibrate).")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "memory_gb" in changes or "peak_tflops" in changes:
        changes.setdefault("gemm_table", () if "peak_tflops" in changes else hw.gemm_table)
    return replace(hw, **changes)


def cpu_profile() -> Hardware:
    """The cached calibration of this machine, measured (quickly) on first use."""
    if os.path.exists(CPU_PROFILE_CACHE):
        with open(CPU_PROFILE_CACHE) as fh:
            cached = json.load(fh)
        if "layer_scale_table" in cached and "pipeline_p2p" in cached:  # older caches lack terms: measure again
            return Hardware.from_json(cached)
    from megatron_lite.planner.calibrate import calibrate
    hw = Hardware.from_json(calibrate(quick=True))
    os.makedirs(os.path.dirname(CPU_PROFILE_CACHE), exist_ok=True)
    with open(CPU_PROFILE_CACHE, "w") as fh:
        json.dump(hw.to_json(), fh, indent=1)
    return hw


def detect(name_hint: Optional[str] = None) -> str:
    """The preset for the device this process sees (pretrain_gpt.py --auto-parallel)."""
    import torch
    if name_hint:
        return name_hint
    if not torch.cuda.is_available():
        return "cpu"
    device = torch.cuda.get_device_name()
    for key, preset in (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A100", "a100-80gb")):
        if key in device:
            return preset
    raise ConfigError(f"--auto-parallel: no hardware preset for {device!r}. Use tools/plan_parallel.py with "
                      f"--hardware-profile, then pass the layout flags it prints.")
