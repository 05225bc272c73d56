"""Bytes this rank holds in parameters, gradients, fp32 main parameters and optimizer states.

Compare with Megatron's table (bytes per parameter, d = DP size, Adam):
    bf16 params, fp32 grads:  18 without, 6 + 12/d with the distributed optimizer
    fp32:                     16 without, 8 + 8/d with the distributed optimizer
(main params that are views of fp32 model params cost nothing, as in Megatron.)
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_lite.distributed.model_chunk import as_model_chunks


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model_chunks: list[nn.Module], optimizer) -> dict:
    """{"params", "grads", "main_params", "optimizer_states", "total": bytes, "num_params": local count,
    "bytes_per_param": total / num_params}. Grads are the DDP grad buffers (padding included) when the
    chunks are DDP-wrapped, else the live .grad tensors."""
    chunks = as_model_chunks(model_chunks)
    params = {id(p): p for chunk in chunks for p in chunk.module.parameters()}
    num_params = sum(p.numel() for p in params.values())
    param_bytes = sum(_nbytes(p) for p in params.values())
    grad_bytes = 0
    for chunk in chunks:
        if chunk.param_and_grad_buffers:
            grad_bytes += sum(_nbytes(b.grad_data) for b in chunk.param_and_grad_buffers)
        else:
            grad_bytes += sum(_nbytes(p.grad) for p in chunk.module.parameters() if p.grad is not None)
    main_bytes = sum(_nbytes(m.main) for m in optimizer.main_params if not m.aliases_model)
    state_bytes = sum(_nbytes(v) for state in optimizer.optimizer.state.values() for k, v in state.items()
                      if torch.is_tensor(v) and k != "step")
    total = param_bytes + grad_bytes + main_bytes + state_bytes
    return {"params": param_bytes, "grads": grad_bytes, "main_params": main_bytes, "optimizer_states": state_bytes,
            "total": total, "num_params": num_params, "bytes_per_param": total / max(num_params, 1)}
