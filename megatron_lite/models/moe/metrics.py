"""Per-iteration MoE metrics for the logger (JSONL keys `load_balancing_loss`, `z_loss`,
`expert_load_imbalance`, `tokens_dropped`), gathered from every rank's MoE layers.

Each MoE layer sums, over the micro-batches since the last log, its share of the balancing loss and z-loss
(each TP x CP rank holds its share of a sequence's loss; divided by the coefficients), the tokens routed to
each expert and the pairs dropped by capacity. `collect` sums these over the world (a layer lives on one
pipeline stage; every TP x CP x DP rank of it routes its own tokens) and reports:
- load_balancing_loss, z_loss: the mean over micro-batches and MoE layers of the whole-sequence losses;
- expert_load_imbalance: max tokens per expert / mean tokens per expert over the interval's batches,
  averaged over MoE layers (1.0 is perfectly balanced, E / k when every token picks the same k experts);
- tokens_dropped: (token, expert) pairs over capacity, summed over layers and batches (capacity only).
Collective over the world: every rank calls it at the same iterations.
"""
from __future__ import annotations

import torch

from megatron_lite import collectives
from megatron_lite.config import Config
from megatron_lite.process_groups import ProcessGroups

_SCALARS = ("load_balancing_loss", "z_loss", "tokens_dropped", "microbatches")


def collect(model_chunks, config: Config, groups: ProcessGroups) -> dict:
    """The interval's MoE metrics (empty for a dense model); clears the layers' sums."""
    from megatron_lite.models.moe.moe_layer import MoELayer
    moe = config.moe
    if not moe.is_moe:
        return {}
    layers, experts = config.model.num_layers, moe.num_experts
    table = torch.zeros(layers, len(_SCALARS) + experts, dtype=torch.float64)
    for chunk in model_chunks:
        for module in getattr(chunk, "module", chunk).modules():
            if isinstance(module, MoELayer) and module.stats:
                row = table[module.layer_number]
                for i, key in enumerate(_SCALARS):
                    row[i] += float(module.stats.get(key, 0.0))
                row[len(_SCALARS):] += module.stats["tokens_per_expert"].double()
                module.stats = {}
    shape = table.shape
    table = table.to(collectives.device_for(groups.world))
    collectives.all_reduce(table, groups.world)
    table = torch.tensor(collectives.to_host(table), dtype=torch.float64).view(shape)
    used = table[:, 3] > 0  # MoE layers that ran this interval
    if not bool(used.any()):
        return {}
    shares = config.parallel.tensor_model_parallel_size * config.parallel.context_parallel_size
    per_batch = table[used, :2] * shares / table[used, 3:4]  # micro-batches were counted once per TP x CP share
    counts = table[used, len(_SCALARS):]
    imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-12)
    metrics = {"expert_load_imbalance": float(imbalance.mean())}
    if moe.moe_aux_loss_coeff > 0 and moe.moe_router_load_balancing_type != "none":
        metrics["load_balancing_loss"] = float(per_batch[:, 0].mean())
    if moe.moe_z_loss_coeff is not None:
        metrics["z_loss"] = float(per_batch[:, 1].mean())
    if moe.moe_expert_capacity_factor is not None:
        metrics["tokens_dropped"] = int(table[used, 2].sum())
    return metrics
