"""Mixture of experts: router (router.py), token dispatchers (dispatcher.py), experts (experts.py), the layer
that replaces an MLP (moe_layer.py), the training-step hooks (hooks.py) and per-iteration metrics (metrics.py).
Only the hooks are imported here: moe_layer.py builds on models/gpt/mlp.py and is imported from there."""
from megatron_lite.models.moe.hooks import finish_moe_step, routers, set_aux_loss_scale

__all__ = ["finish_moe_step", "routers", "set_aux_loss_scale"]
