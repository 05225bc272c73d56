"""Bytes this rank holds in parameters, gradients, fp32 main parameters and optimizer states, and where.

Bytes per parameter per rank for Adam (K = 12: fp32 main copy + two moments), d = DP size. The ZeRO paper
assumes 16-bit gradients; Megatron (and megatron_lite) accumulates and reduces gradients in an fp32 buffer
with --bf16, so each of its rows carries 2 more bytes of gradient:

    strategy (--data-parallel-sharding-strategy)   ZeRO paper (bf16 grads)   megatron_lite bf16 (fp32 grads)   fp32
    no_shard                                        16                        18                                16
    optim        (ZeRO-1)                           4 + 12/d                  6 + 12/d                          8 + 8/d
    optim_grads  (ZeRO-2)                           2 + 14/d                  2 + 16/d                          4 + 12/d
    optim_grads_params (ZeRO-3)                     16/d                      18/d                              16/d

Main params that are views of fp32 model params (ZeRO-3: of the parameter shards) cost nothing, as in
Megatron. ZeRO-3's `params` are the shards plus whatever units are gathered when the report is taken (none at
rest: during a step at most two units, distributed/zero3.py). ZeRO-2's and ZeRO-3's rows are the memory at
rest: during the last micro-batch's backward each bucket's full gradient lives until its reduce-scatter
(see distributed/param_and_grad_buffer.py), reported as `grads_peak`.
Offloaded optimizer state (--optimizer-cpu-offload) counts under `host`, not on the device, so
`device_total` shrinks while `total` (device + host + disk) still matches the table.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_lite.distributed.model_chunk import as_model_chunks

KEYS = ("params", "grads", "main_params", "optimizer_states", "host", "disk")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grad_bytes(chunks) -> tuple[int, int]:
    """(bytes of gradient storage held now, the most held at once so far)."""
    now = peak = 0
    for chunk in chunks:
        if chunk.param_and_grad_buffers:
            now += sum(b.grad_bytes() for b in chunk.param_and_grad_buffers)
            peak += sum(max(b.peak_grad_bytes, b.grad_bytes()) for b in chunk.param_and_grad_buffers)
        else:
            held = sum(_nbytes(p.grad) for p in chunk.module.parameters() if p.grad is not None)
            now, peak = now + held, peak + held
    return now, peak


def _param_bytes(chunks, params: dict) -> int:
    """Parameter storage held now: ZeRO-3 buffers report their shards (and any gathered unit), other
    parameters count whole."""
    buffers = [b for chunk in chunks for b in chunk.param_and_grad_buffers if getattr(b, "shard_params", False)]
    in_buffers = {id(p) for b in buffers for p in b.params}
    return sum(b.param_bytes() for b in buffers) + sum(_nbytes(p) for k, p in params.items() if k not in in_buffers)


def memory_report(model_chunks: list[nn.Module], optimizer) -> dict:
    """Per rank: {"params", "grads" (at rest), "main_params", "optimizer_states" (device bytes), "host",
    "disk" (offloaded main params + states), "grads_peak", "device_total", "total" (device + host + disk),
    "num_params" (local count), "bytes_per_param" (total / num_params), "device_bytes_per_param"}.
    Grads are the DDP grad buffers (padding included; ZeRO-2: the shards) when the chunks are DDP-wrapped,
    else the live .grad tensors."""
    chunks = as_model_chunks(model_chunks)
    params = {id(p): p for chunk in chunks for p in chunk.module.parameters()}
    num_params = sum(p.numel() for p in params.values())
    report = dict.fromkeys(KEYS, 0)
    report["params"] = _param_bytes(chunks, params)
    report["grads"], report["grads_peak"] = _grad_bytes(chunks)
    for m in optimizer.main_params:
        where = getattr(m, "location", "device")
        if not m.aliases_model:
            report["main_params" if where == "device" else where] += _nbytes(m.main)
        for key in optimizer.state_keys:
            report["optimizer_states" if where == "device" else where] += _nbytes(optimizer.state_tensor(m, key))
    report["device_total"] = sum(report[k] for k in ("params", "grads", "main_params", "optimizer_states"))
    report["total"] = report["device_total"] + report["host"] + report["disk"]
    report["num_params"] = num_params
    report["bytes_per_param"] = report["total"] / max(num_params, 1)
    report["device_bytes_per_param"] = report["device_total"] / max(num_params, 1)
    return report

