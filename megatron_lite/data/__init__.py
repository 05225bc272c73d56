"""Data pipeline: tokenizers, Megatron .bin/.idx datasets, GPT samples, blending, samplers.

Submodules are imported lazily so that tools (preprocess_data.py) do not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_tokenizer": "megatron_lite.data.tokenizers",
    "IndexedDataset": "megatron_lite.data.indexed_dataset",
    "IndexedDatasetBuilder": "megatron_lite.data.indexed_dataset",
    "GPTDataset": "megatron_lite.data.gpt_dataset",
    "MockLowLevelDataset": "megatron_lite.data.gpt_dataset",
    "BlendedDataset": "megatron_lite.data.blended_dataset",
    "build_gpt_datasets": "megatron_lite.data.builder",
    "parse_data_path": "megatron_lite.data.builder",
    "MegatronPretrainingSampler": "megatron_lite.data.samplers",
    "build_pretraining_data_loader": "megatron_lite.data.samplers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_lite.data' has no attribute {name!r}")
