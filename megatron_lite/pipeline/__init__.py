"""Pipeline parallelism: stage assignment, schedules as action lists, their runner and p2p exchange.

The names below are loaded on first use (PEP 562), so importing one submodule (e.g. the layout rules
that configuration validation uses) does not import the whole engine.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"allreduce_embedding_grads": "megatron_lite.pipeline.embedding",
            "build_model_chunks": "megatron_lite.pipeline.stages",
            "layers_for_stage": "megatron_lite.pipeline.stages",
            "get_forward_backward_func": "megatron_lite.pipeline.runner"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_lite.pipeline' has no attribute {name!r}")
