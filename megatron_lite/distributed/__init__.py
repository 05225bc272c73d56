"""Data-parallel gradient reduction: DistributedDataParallel and finalize_model_grads."""
from megatron_lite.distributed.ddp import DistributedDataParallel
from megatron_lite.distributed.finalize_model_grads import finalize_model_grads

__all__ = ["DistributedDataParallel", "finalize_model_grads"]
