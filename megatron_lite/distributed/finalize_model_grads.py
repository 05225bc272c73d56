"""After the last micro-batch's backward: make every rank's gradients final (docs/internals.md order)."""
from __future__ import annotations

from torch import nn


def finalize_model_grads(model_chunks: list[nn.Module]) -> None:
    """1. DDP's bucketed reduction over DP x CP; 2. sequence-parallel grads over TP; 3. tied embeddings
    over the embedding group. Steps 2 and 3 read `.main_grad` when present, else `.grad`."""
    # Imported here, not at module level: the pipeline engine imports this module, and the model side
    # must stay importable without the distributed package.
    from megatron_lite.pipeline.embedding import allreduce_embedding_grads
    from megatron_lite.tensor_parallel import allreduce_sequence_parallel_grads

    for chunk in model_chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync()
    allreduce_sequence_parallel_grads(model_chunks)
    allreduce_embedding_grads(model_chunks)
