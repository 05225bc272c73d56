"""RNG streams for tensor parallelism and activation recomputation (Megatron's CudaRNGStatesTracker).

Two streams per rank:
- the *default* torch stream, seeded with --seed identically on every TP rank, drives dropout in
  replicated regions (hidden dropout without sequence parallelism), so all TP ranks drop the same units;
- the tracker's 'model-parallel-rng' stream, seeded with seed + 2718 + tp_rank, drives dropout in
  TP-split regions (attention probabilities of this rank's heads, hidden states under sequence
  parallelism), so different shards get independent masks.
`get_rng_tracker().fork()` switches the default generator(s) to a tracker stream for a block of code.
On CPU the CPU generator is forked; on a CUDA machine the CUDA generator as well.

`checkpoint(fn, *args)` recomputes `fn` in backward and replays the default and tracker streams, so
dropout masks in the recomputation equal those of the forward.
"""
from __future__ import annotations

import contextlib
import random as py_random
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.utils.checkpoint

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron's offset of the tensor-parallel stream


def _cuda() -> bool:
    return torch.cuda.is_available()


def _get_default_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if _cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_default_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and _cuda():
        torch.cuda.set_rng_state(state["cuda"])


def _state_from_seed(seed: int) -> dict[str, torch.Tensor]:
    """The default-generator state that manual_seed(seed) would give, without disturbing the current one."""
    saved = _get_default_state()
    torch.manual_seed(seed)  # seeds the CPU and (when present) every CUDA generator
    state = _get_default_state()
    _set_default_state(saved)
    return state


class RNGStatesTracker:
    """Named RNG streams that can be swapped in with fork(), and saved/restored for checkpoints."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self._states)

    def add(self, name: str, seed: int) -> None:
        if seed in self._seeds:
            raise RuntimeError(f"RNG seed {seed} is already used by another stream")
        if name in self._states:
            raise RuntimeError(f"RNG stream {name!r} already exists")
        self._seeds.add(seed)
        self._states[name] = _state_from_seed(seed)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of every stream's state (for checkpoints and recomputation)."""
        return {name: {dev: t.clone() for dev, t in state.items()} for name, state in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self._states = {name: {dev: t.clone() for dev, t in state.items()} for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with the default generator(s) set to stream `name`; advance the stream."""
        if name not in self._states:
            raise RuntimeError(f"RNG stream {name!r} is not set: call model_parallel_seed(seed, tp_rank) first")
        outer = _get_default_state()
        _set_default_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_default_state()
            _set_default_state(outer)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int = 0) -> None:
    """Seed the default stream with `seed` (the same on every TP rank) and the tensor-parallel stream
    with seed + 2718 + tp_rank, as Megatron's model_parallel_cuda_manual_seed. (Training adds
    100 x pp_rank to `seed` first, as Megatron does, so pipeline stages draw different masks.)"""
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + tp_rank)


def get_all_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU, CUDA (when present) and tracker states, for checkpoints."""
    states: dict[str, Any] = {"python": py_random.getstate(), "numpy": np.random.get_state(),
                              "torch_cpu": torch.get_rng_state(), "tracker": _TRACKER.get_states()}
    if _cuda():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_all_rng_states(states: dict[str, Any]) -> None:
    py_random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    if "cuda" in states and _cuda():
        torch.cuda.set_rng_state(states["cuda"])
    _TRACKER.set_states(states["tracker"])


_CHECKPOINTED_FORWARDS = [0]  # how many checkpoint() forwards are running (ZeRO-3 asks, distributed/zero3.py)


def in_checkpointed_forward() -> bool:
    """True inside the first (not the recomputing) forward of a checkpoint() region: what runs here will
    be run again during backward."""
    return _CHECKPOINTED_FORWARDS[0] > 0


_RECOMPUTING = [0]  # > 0 while a checkpointed forward is being replayed in backward


def is_recomputing() -> bool:
    """True inside the replay of a checkpointed forward: statistics (MoE token counts, balancing losses)
    must not be counted twice."""
    return _RECOMPUTING[0] > 0


def checkpoint(fn: Callable, *args: Any) -> Any:
    """Activation checkpointing of fn(*args): nothing inside is kept for backward, it is recomputed.

    torch's non-reentrant checkpoint replays the default CPU/CUDA generators; the two context
    managers below replay the tracker streams too, so TP-split dropout gets the same masks.
    """
    saved: dict[str, Any] = {}

    @contextlib.contextmanager
    def forward_context() -> Iterator[None]:
        saved["tracker"] = _TRACKER.get_states()
        _CHECKPOINTED_FORWARDS[0] += 1
        try:
            yield
        finally:
            _CHECKPOINTED_FORWARDS[0] -= 1

    @contextlib.contextmanager
    def recompute_context() -> Iterator[None]:
        current = _TRACKER.get_states()
        _TRACKER.set_states(saved["tracker"])
        _RECOMPUTING[0] += 1
        try:
            yield
        finally:
            _RECOMPUTING[0] -= 1
            _TRACKER.set_states(current)

    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                                             context_fn=lambda: (forward_context(), recompute_context()))
