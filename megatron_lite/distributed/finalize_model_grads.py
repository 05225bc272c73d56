"""After the last micro-batch's backward: make every rank's gradients final (docs/internals.md order)."""
from __future__ import annotations

from megatron_lite.distributed.model_chunk import ModelChunk
from megatron_lite.models.moe import finish_moe_step
from megatron_lite.pipeline.embedding import allreduce_embedding_grads
from megatron_lite.process_groups import ProcessGroups
from megatron_lite.tensor_parallel.layers import allreduce_sequence_parallel_grads


def finalize_model_grads(model_chunks: list[ModelChunk], groups: ProcessGroups) -> None:
    """1. DDP's bucketed reduction over DP x CP; 2. sequence-parallel grads over TP; 3. tied embeddings
    over the embedding group. Steps 2 and 3 read `.main_grad` when present, else `.grad`."""
    for chunk in model_chunks:
        chunk.finish_grad_sync()
    allreduce_sequence_parallel_grads(model_chunks, groups.tp)
    allreduce_embedding_grads(model_chunks, groups)
    finish_moe_step(model_chunks)  # MoE: expert-bias update from the step's token counts (over TP x DP x CP)
