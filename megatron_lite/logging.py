"""Training metrics: Megatron-shaped console lines, a JSON Lines file, TensorBoard and wandb.

One `MetricsLogger` per process; only the logging rank (last pipeline stage, first TP/DP/CP rank)
writes anything, so a user sees one line per interval whatever the layout.

JSONL records (one object per logged iteration, one per evaluation), snake_case keys:
  training: iteration, train_iters, consumed_samples, lm_loss, learning_rate, global_batch_size,
            grad_norm, num_zeros_in_grad, loss_scale, skipped_iterations, nan_iterations,
            elapsed_time_per_iteration_ms, tokens_per_sec, tokens_per_sec_per_device,
            tflops_per_device, mfu, mem_allocated_gb, mem_max_allocated_gb, timestamp; with MoE also
            load_balancing_loss, z_loss, expert_load_imbalance, tokens_dropped (models/moe/metrics.py)
  evaluation: split ("valid" or "test"), iteration, consumed_samples, lm_loss, ppl, timestamp
  memory (once, at start-up; the logging rank's own bytes): record = "memory", strategy, params, grads,
            main_params, optimizer_states, host, disk, grads_peak, device_total, total, num_params,
            bytes_per_param, device_bytes_per_param (optimizer/memory.py); with --measure-activation-memory
            also activations (the first step's peak saved-activation bytes, planner/measure.py), and the
            record is written after that step
"""
from __future__ import annotations

import collections
import json
import math
import os
import resource
import sys
import time
from typing import Any, Optional

import torch

from megatron_lite.process_groups import ProcessGroups

# Dense bf16 peak TFLOP/s per device, for MFU when --peak-tflops is not given.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                "A10": 125.0, "V100": 125.0, "GH200": 989.0, "B200": 2250.0}


def detect_peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in sorted(_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None


def num_floating_point_operations(config, batch_size: int) -> float:
    """Model FLOPs of one forward+backward over `batch_size` samples (Megatron-LM's formula, from
    Narayanan et al. 2021, extended for GQA and SwiGLU): 3 passes (fwd + 2x bwd) x 2 FLOPs per MAC
    over the QKV/output projections, the attention scores and values, the MLP and the logits.
    Activation recomputation is deliberately not counted (model FLOPs, as in MFU)."""
    m = config.model
    hidden, layers, seq = m.hidden_size, m.num_layers, m.seq_length
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    query_projection_ratio = m.head_dim * heads / hidden
    vocab = padded_vocab_size(config)
    return (12 * batch_size * seq * layers * hidden * hidden * (
        (1 + groups / heads + seq / hidden) * query_projection_ratio   # QKV + proj, and attention
        + mlp_flops_ratio(config)                                      # MLP, or MoE (mean over layers)
        + vocab / (2 * layers * hidden)))                              # logits


def mlp_flops_ratio(config) -> float:
    """The MLP's MACs per token / (2 h^2), averaged over layers. A MoE layer counts its active parameters:
    top-k routed experts of --moe-ffn-hidden-size, the shared expert (and its gate) and the router's [E, h]
    GEMM; dense layers count --ffn-hidden-size."""
    m, moe = config.model, config.moe
    gated, hidden = (1.5 if m.swiglu else 1.0), m.hidden_size
    dense = m.ffn_hidden_size / hidden * gated
    if not moe.is_moe:
        return dense
    shared = moe.moe_shared_expert_intermediate_size or 0
    active = (moe.moe_router_topk * moe.moe_ffn_hidden_size + shared) / hidden * gated
    active += (moe.num_experts + (1 if moe.moe_shared_expert_gate else 0)) / (2 * hidden)  # router (+ gate) GEMMs
    pattern = moe.layer_pattern(m.num_layers)
    return sum(active if is_moe else dense for is_moe in pattern) / m.num_layers


def padded_vocab_size(config) -> int:
    """The vocabulary the output layer computes (Megatron counts the padded rows in its FLOPs too)."""
    from megatron_lite.tensor_parallel.utils import pad_vocab_size
    m = config.model
    return pad_vocab_size(m.vocab_size or 0, m.make_vocab_size_divisible_by, config.parallel.tensor_model_parallel_size)


def is_logging_rank(groups: Optional[ProcessGroups] = None) -> bool:
    """The loss stage's (the last pipeline stage's; rank 0's with ZB-V) first TP and DP x CP rank (every rank of
    a one-process layout)."""
    if groups is None:
        return True
    return groups.is_loss_stage and groups.tp.rank == 0 and groups.dp_cp.rank == 0


def memory_gb() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"mem_allocated_gb": torch.cuda.memory_allocated() / 2**30,
                "mem_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
    # CPU: the process's peak resident set (ru_maxrss is in KiB on Linux).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mem_allocated_gb": None, "mem_max_allocated_gb": peak}


class MetricsLogger:
    def __init__(self, config, world_size: int, groups: Optional[ProcessGroups] = None):
        self.config = config
        self.world_size = world_size
        self.enabled = is_logging_rank(groups)
        self.peak_tflops = config.logging.peak_tflops or detect_peak_tflops()
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not self.enabled:
            return
        log = config.logging
        if log.metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(log.metrics_jsonl)), exist_ok=True)
            self.jsonl = open(log.metrics_jsonl, "a", buffering=1)
        if log.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=log.tensorboard_dir)
        if log.wandb_project:
            import wandb
            save_dir = log.wandb_save_dir or os.path.join(log.tensorboard_dir or ".", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self.wandb = wandb.init(project=log.wandb_project, name=log.wandb_exp_name, dir=save_dir,
                                    config=config.to_dict())

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def _write(self, record: dict[str, Any], step: int, prefix: str) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in numeric.items()}, step=step)

    def log_training(self, iteration: int, train_iters: int, consumed_samples: int, lm_loss: Optional[float],
                     learning_rate: float, global_batch_size: int, grad_norm: Optional[float],
                     num_zeros: Optional[int], loss_scale: float, skipped: int, nan_iterations: int,
                     elapsed_per_iteration_s: float, extra: Optional[dict] = None) -> dict:
        tokens = global_batch_size * self.config.model.seq_length
        tokens_per_sec = tokens / elapsed_per_iteration_s
        tflops = num_floating_point_operations(self.config, global_batch_size) / elapsed_per_iteration_s / self.world_size / 1e12
        record = {
            "iteration": iteration, "train_iters": train_iters, "consumed_samples": consumed_samples,
            "lm_loss": lm_loss, "learning_rate": learning_rate, "global_batch_size": global_batch_size,
            "grad_norm": grad_norm, "num_zeros_in_grad": num_zeros, "loss_scale": loss_scale,
            "skipped_iterations": skipped, "nan_iterations": nan_iterations,
            "elapsed_time_per_iteration_ms": elapsed_per_iteration_s * 1000.0,
            "tokens_per_sec": tokens_per_sec, "tokens_per_sec_per_device": tokens_per_sec / self.world_size,
            "tflops_per_device": tflops, "mfu": (tflops / self.peak_tflops) if self.peak_tflops else None,
            "timestamp": time.time(),
        }
        record.update(extra or {})  # MoE: load_balancing_loss, z_loss, expert_load_imbalance, tokens_dropped
        if self.config.logging.log_memory:
            record.update(memory_gb())
        if self.enabled:
            parts = [f" iteration {iteration:8d}/{train_iters:8d}", f"consumed samples: {consumed_samples:12d}",
                     f"elapsed time per iteration (ms): {elapsed_per_iteration_s * 1000.0:.1f}",
                     f"throughput per GPU (TFLOP/s/GPU): {tflops:.3f}", f"tokens/s: {tokens_per_sec:.0f}",
                     f"learning rate: {learning_rate:.6E}", f"global batch size: {global_batch_size:5d}"]
            if lm_loss is not None:
                parts.append(f"lm loss: {lm_loss:.6E}")
            parts.append(f"loss scale: {loss_scale:.1f}")
            if grad_norm is not None:
                parts.append(f"grad norm: {grad_norm:.3f}")
            if num_zeros is not None:
                parts.append(f"num zeros: {num_zeros}")
            parts += [f"{key.replace('_', ' ')}: {value:.6E}" if isinstance(value, float) else f"{key.replace('_', ' ')}: {value}"
                      for key, value in (extra or {}).items()]
            parts += [f"number of skipped iterations: {skipped:3d}", f"number of nan iterations: {nan_iterations:3d}"]
            print(" | ".join(parts) + " |", flush=True)
            self._write(record, iteration, "train")
        return record

    def log_loss_spike(self, iteration: int, spike: dict) -> None:
        """One console line and one JSONL record {"record": "loss_spike", ...} (--log-loss-spikes)."""
        if not self.enabled:
            return
        print(f"loss spike at iteration {iteration}: lm loss {spike['lm_loss']:.6E} is {spike['z']:.1f} standard "
              f"deviations above the mean {spike['window_mean']:.6E} of the previous {spike['window']} iterations",
              flush=True)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"record": "loss_spike", "iteration": iteration, **spike,
                                         "timestamp": time.time()}) + "\n")

    def log_memory(self, report: dict, strategy: str) -> dict:
        """The start-up memory report (optimizer/memory.py's memory_report): one console line, one JSONL record."""
        record = {"record": "memory", "strategy": strategy, **report, "timestamp": time.time()}
        if self.enabled:
            parts = [f"strategy: {strategy}"]
            parts += [f"{key}: {report[key] / 2**20:.2f} MiB" for key in
                      ("params", "grads", "grads_peak", "main_params", "optimizer_states", "host", "disk", "total")]
            if report.get("activations") is not None:
                parts.append(f"activations (measured, step 1): {report['activations'] / 2**20:.2f} MiB")
            parts += [f"bytes/param: {report['bytes_per_param']:.2f}",
                      f"device bytes/param: {report['device_bytes_per_param']:.2f}"]
            print("memory (this rank) | " + " | ".join(parts) + " |", flush=True)
            if self.jsonl is not None:
                self.jsonl.write(json.dumps(record) + "\n")
        return record

    def log_evaluation(self, split: str, iteration: int, consumed_samples: int, lm_loss: float) -> dict:
        ppl = math.exp(min(20.0, lm_loss))
        record = {"split": split, "iteration": iteration, "consumed_samples": consumed_samples,
                  "lm_loss": lm_loss, "ppl": ppl, "timestamp": time.time()}
        if self.enabled:
            line = f" {split} loss at iteration {iteration} | lm loss value: {lm_loss:.6E} | lm loss PPL: {ppl:.6E} | "
            print("-" * (len(line) + 1) + "\n" + line + "\n" + "-" * (len(line) + 1), flush=True)
            self._write(record, iteration, split)
        return record

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class LossSpikeDetector:
    """--log-loss-spikes: a loss more than `threshold` standard deviations above the mean of the previous
    `window` losses (at least 10 of them, or `window` if smaller) is a spike. O(window) per iteration on the
    host; the losses are the ones the loop already has, so it costs no communication."""

    def __init__(self, threshold: float, window: int):
        self.threshold, self.window = threshold, window
        self.history: collections.deque = collections.deque(maxlen=window)

    def update(self, loss: Optional[float]) -> Optional[dict]:
        """The spike's description, or None. Non-finite losses are the NaN guard's business: ignored."""
        if loss is None or not math.isfinite(loss):
            return None
        spike = None
        if len(self.history) >= min(10, self.window):
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            std = max(std, 1e-6 * max(abs(mean), 1.0))  # a flat window: any clear jump counts
            z = (loss - mean) / std
            if z > self.threshold:
                spike = {"lm_loss": loss, "window_mean": mean, "window_std": std, "z": z, "window": len(self.history)}
        self.history.append(loss)
        return spike


def print_rank_0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True, file=sys.stdout)
