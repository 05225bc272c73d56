"""Tensor-parallel building blocks: mappings, layers, vocab-parallel cross entropy, RNG tracker, ShardSpec and sharding utils."""
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                  allreduce_sequence_parallel_grads, mask_padded_vocab, vocab_range)
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region)
from megatron_lite.tensor_parallel.random import (checkpoint, get_all_rng_states, get_rng_tracker, model_parallel_seed,
                                                  set_all_rng_states)
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec, shard_spec_of
from megatron_lite.tensor_parallel.utils import (full_from_shards, full_shape, gather_full_param, initialize_param,
                                                 pad_vocab_size, shard_of_full)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "allreduce_sequence_parallel_grads",
    "mask_padded_vocab", "vocab_range", "vocab_parallel_cross_entropy",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "checkpoint", "get_rng_tracker", "model_parallel_seed", "get_all_rng_states", "set_all_rng_states",
    "full_from_shards", "full_shape", "gather_full_param", "initialize_param", "pad_vocab_size",
    "shard_of_full", "ShardSpec", "set_shard_spec", "shard_spec_of",
]
