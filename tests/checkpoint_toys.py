"""Small stand-ins for checkpoint tests: a GPT-shaped toy model chunk whose parameters carry the metadata
of docs/internals.md (vocab-parallel padded embedding, stride-2 SwiGLU fc1, row-parallel fc2, replicated
norms, the tied output copy on the last stage), a toy Adam with the optimizer's checkpoint interface,
and a toy LR scheduler. Full tensors are seeded by name, so every layout holds shards of the same model.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megatron_lite.pipeline.stages import layers_for_stage
from megatron_lite.tensor_parallel.shard_spec import ShardSpec, set_shard_spec, shard_spec_of
from megatron_lite.tensor_parallel.utils import pad_vocab_size, seed_for, shard_of_full

VOCAB, HIDDEN, FFN, DIVISIBLE_BY = 50, 8, 12, 4


def param_specs(num_layers: int, hidden: int = HIDDEN, ffn: int = FFN, vocab: int = VOCAB) -> dict:
    """name -> (full shape, tensor_model_parallel, partition_dim, stride, unpadded_size)."""
    specs = {"embedding.word_embeddings.weight": ((vocab, hidden), True, 0, 1, vocab)}
    for i in range(num_layers):
        specs[f"decoder.layers.{i}.input_layernorm.weight"] = ((hidden,), False, -1, 1, None)
        specs[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = ((2 * ffn, hidden), True, 0, 2, None)
        specs[f"decoder.layers.{i}.mlp.linear_fc1.bias"] = ((2 * ffn,), True, 0, 2, None)
        specs[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = ((hidden, ffn), True, 1, 1, None)
    specs["decoder.final_layernorm.weight"] = ((hidden,), False, -1, 1, None)
    specs["output_layer.weight"] = ((vocab, hidden), True, 0, 1, vocab)
    return specs


def full_tensor(name: str, shape, seed: int = 1234) -> torch.Tensor:
    if name == "output_layer.weight":  # tied: starts equal to the embedding (docs/internals.md)
        name = "embedding.word_embeddings.weight"
    generator = torch.Generator().manual_seed(seed_for(seed, name))
    return torch.randn(shape, generator=generator)


class ToyChunk(nn.Module):
    """One model chunk: parameters only, stored by global name (dots replaced inside a ParameterDict)."""

    def __init__(self, layers: list[int], pre: bool, post: bool, tp_rank: int, tp_size: int, num_layers: int,
                 tied: bool = True, pp_size: int = 1, hidden: int = HIDDEN, seed: int = 1234):
        super().__init__()
        self.store = nn.ParameterDict()
        specs = param_specs(num_layers, hidden=hidden)
        wanted = [n for n in specs if (n.startswith("embedding.") and pre)
                  or any(n.startswith(f"decoder.layers.{i}.") for i in layers)
                  or (n == "decoder.final_layernorm.weight" and post)
                  or (n == "output_layer.weight" and post and (not tied or pp_size > 1))]
        for name in wanted:
            shape, parallel, dim, stride, unpadded = specs[name]
            local_shape = list(shape)
            if parallel:
                rows = pad_vocab_size(unpadded, DIVISIBLE_BY, tp_size) if unpadded else shape[dim]
                local_shape[dim] = rows // tp_size
            param = nn.Parameter(torch.empty(local_shape))
            set_shard_spec(param, ShardSpec(dim if parallel else None, stride if parallel else 1, unpadded_size=unpadded))
            param.toy_first_row = tp_rank * local_shape[dim] if parallel else 0
            param.shared_embedding = tied and pp_size > 1 and name in ("embedding.word_embeddings.weight", "output_layer.weight")
            with torch.no_grad():
                param.copy_(shard_of_full(full_tensor(name, shape, seed), param, tp_rank, tp_size))
            self.store[name.replace(".", "__")] = param

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for key, param in self.store.items():
            yield key.replace("__", "."), param


def build_chunks(num_layers: int, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int,
                 vp_size: Optional[int] = None, tied: bool = True, **kwargs) -> list[ToyChunk]:
    chunks = []
    for v in range(vp_size or 1):
        layers = layers_for_stage(num_layers, pp_size, pp_rank, vp_size, v)
        pre = pp_rank == 0 and v == 0
        post = pp_rank == pp_size - 1 and v == (vp_size or 1) - 1
        chunks.append(ToyChunk(layers, pre, post, tp_rank, tp_size, num_layers, tied, pp_size, **kwargs))
    return chunks


def named(chunks) -> dict[str, nn.Parameter]:
    return {n: p for c in chunks for n, p in c.named_parameters()}


class ToyAdam:
    """Adam with fp32 main params and the checkpoint interface of megatron_lite.optimizer."""

    def __init__(self, chunks, lr: float = 1e-2):
        self.params = named(chunks)
        self.lr, self.steps, self.scale = lr, 0, 2.0 ** 16
        self.state = {n: {"param": p.detach().clone().float(), "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                          "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)} for n, p in self.params.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for name, param in self.params.items():
            s, grad = self.state[name], param.grad.float()
            s["exp_avg"].mul_(0.9).add_(grad, alpha=0.1)
            s["exp_avg_sq"].mul_(0.999).addcmul_(grad, grad, value=0.001)
            s["param"].sub_(self.lr * s["exp_avg"] / (s["exp_avg_sq"].sqrt() + 1e-8))
            param.copy_(s["param"])
            param.grad = None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "scale": self.scale, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.scale, self.lr = state["steps"], state["scale"], state["lr"]

    def get_parameter_state(self) -> dict:
        return {n: {k: v.clone() for k, v in s.items()} for n, s in self.state.items()}

    def set_parameter_state(self, states: dict) -> None:
        assert set(states) == set(self.state), (sorted(states), sorted(self.state))
        for name, s in states.items():
            for key, value in s.items():
                assert value.shape == self.state[name][key].shape, (name, key)
                self.state[name][key].copy_(value)

    def reload_model_params(self) -> None:
        for name, param in self.params.items():
            self.state[name]["param"].copy_(param.detach())


class ToyScheduler:
    def __init__(self):
        self.num_steps = 0

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = state["num_steps"]


def train_step(chunks, optimizer: ToyAdam, scheduler: ToyScheduler) -> None:
    """A step whose gradient draws from the torch RNG (like dropout), so RNG restore matters."""
    for name, param in named(chunks).items():
        param.grad = param.detach() * 0.1 + torch.randn(param.shape) * math.sqrt(0.01)
        spec = shard_spec_of(param)
        if param.shared_embedding or not spec.is_sharded:
            # Replicas must stay equal (TP-replicated params; the tied pair, which the embedding-group
            # all-reduce keeps equal), so only TP shards see the RNG, like TP-local dropout.
            param.grad = param.detach() * 0.1
        if spec.unpadded_size is not None:  # padded vocab rows get no gradient and stay zero (internals.md)
            first_pad = max(0, spec.unpadded_size - param.toy_first_row)
            param.grad[first_pad:] = 0
    optimizer.step()
    scheduler.step()


def assert_same_states(a: dict, b: dict) -> None:
    """Two snapshots {"model", "optim", "common", "sched"} are bitwise equal."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        for key in a["optim"][name]:
            assert torch.equal(a["optim"][name][key], b["optim"][name][key]), (name, key)
    assert a["common"] == b["common"] and a["sched"] == b["sched"]


# ---- expected shards, independent of tensor_parallel.utils ---------------------------------------------
# Reshard tests must not build their expectations with shard_of_full/full_from_shards, the helpers the
# loader itself uses: a bug there would cancel out. These restate the contract of docs/internals.md by
# explicit index arithmetic instead (checked against hand-built shards in tests/unit/test_checkpoint.py).
def _layout(meta) -> dict:
    """The sharding description as a plain dict: accepts the dict of per-parameter attributes
    (tensor_model_parallel, partition_dim, partition_stride, unpadded_size, local_shape) or a
    (spec, local_shape) pair whose spec has partition_dim (None: replicated), stride and unpadded_size."""
    if isinstance(meta, dict):
        return meta
    spec, local_shape = meta
    return {"tensor_model_parallel": spec.partition_dim is not None, "partition_dim": spec.partition_dim,
            "partition_stride": spec.stride, "unpadded_size": spec.unpadded_size, "local_shape": tuple(local_shape)}


def shard_rows(meta, tp_rank: int, tp_size: int) -> list[int]:
    """Indices along partition_dim of the padded full tensor that TP rank `tp_rank` holds, in order:
    the full dim is `stride` equal pieces, and the rank holds its contiguous 1/tp of each piece."""
    meta = _layout(meta)
    local = meta["local_shape"][meta["partition_dim"]]
    stride = meta["partition_stride"]
    per_piece = local // stride  # rows of each piece on one rank
    piece = per_piece * tp_size
    return [k * piece + tp_rank * per_piece + j for k in range(stride) for j in range(per_piece)]


def expected_shard(full: torch.Tensor, meta, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The shard a rank must hold of the canonical (unpadded) full tensor; rows past the real
    vocabulary are zero."""
    meta = _layout(meta)
    if not meta["tensor_model_parallel"]:
        return full
    dim = meta["partition_dim"] % full.dim()
    rows = shard_rows(meta, tp_rank, tp_size)
    moved = full.movedim(dim, 0)
    out = torch.zeros((len(rows),) + tuple(moved.shape[1:]), dtype=full.dtype)
    for i, row in enumerate(rows):
        if row < moved.shape[0]:
            out[i] = moved[row]
    return out.movedim(0, dim).contiguous()


def expected_full(shards: list[torch.Tensor], meta) -> torch.Tensor:
    """The canonical full tensor from every TP rank's shard (rank order), padding dropped."""
    meta = _layout(meta)
    if not meta["tensor_model_parallel"]:
        return shards[0]
    dim = meta["partition_dim"] % shards[0].dim()
    tp_size = len(shards)
    total = shards[0].shape[dim] * tp_size
    size = meta["unpadded_size"] if meta["unpadded_size"] is not None else total
    rows: dict[int, torch.Tensor] = {}
    for tp_rank, shard in enumerate(shards):
        for i, row in enumerate(shard_rows(meta, tp_rank, tp_size)):
            rows[row] = shard.movedim(dim, 0)[i]
    assert sorted(rows) == list(range(total))
    return torch.stack([rows[r] for r in range(size)]).movedim(0, dim).contiguous()
