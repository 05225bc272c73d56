"""Pipeline parallelism: stage assignment, schedules as action lists, their runner and p2p exchange."""
from megatron_lite.pipeline.embedding import allreduce_embedding_grads
from megatron_lite.pipeline.schedules import get_forward_backward_func
from megatron_lite.pipeline.stages import build_model_chunks, layers_for_stage

__all__ = ["allreduce_embedding_grads", "build_model_chunks", "get_forward_backward_func", "layers_for_stage"]
