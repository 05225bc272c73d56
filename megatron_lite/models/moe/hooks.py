"""What the training step does to every MoE layer's router (found by type, so DDP, the pipeline runner and
finalize_model_grads need not import the model): set the balancing losses' gradient scale, update expert
biases and restart the global balancing loss's counts after the step's backward."""
from __future__ import annotations

import torch

from megatron_lite.models.moe.router import TopKRouter


def routers(model_chunks) -> list[TopKRouter]:
    """Every MoE router of these model chunks (wrapped or not), in module order."""
    return [m for chunk in model_chunks for m in getattr(chunk, "module", chunk).modules() if isinstance(m, TopKRouter)]


def set_aux_loss_scale(model_chunks, scale: float) -> None:
    """The gradient each balancing loss and z-loss gets in backward: what one micro-batch's LM loss gets
    (the pipeline runner sets loss scale x CP / micro-batches before each step)."""
    for router in routers(model_chunks):
        router.aux_loss_scale = torch.tensor(float(scale))


def finish_moe_step(model_chunks) -> None:
    """After the step's last backward (finalize_model_grads, on every rank): update expert biases from the
    step's token counts and restart the global balancing loss's running counts."""
    for router in routers(model_chunks):
        router.update_expert_bias()
        router.reset_step()
