"""Mixture of experts: router (router.py), token dispatchers (dispatcher.py), experts (experts.py), the layer
that replaces an MLP (moe_layer.py) and its per-iteration metrics (metrics.py)."""
from megatron_lite.models.moe.moe_layer import (MoELayer, build_mlp, finish_moe_step, is_moe_layer, moe_layers,
                                                set_aux_loss_scale)

__all__ = ["MoELayer", "build_mlp", "finish_moe_step", "is_moe_layer", "moe_layers", "set_aux_loss_scale"]
