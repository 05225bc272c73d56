"""ShardSpec: the one description of how a parameter's local tensor is cut from its canonical full tensor.

Layers attach a ShardSpec to every parameter they create (`param.shard_spec`); initialisation, gradient
statistics, checkpoints (saved in metadata.json), offline conversion and resharding all read it, so the
rule for cutting a tensor exists once. A canonical full tensor is what the single-process model holds
(vocabulary rows unpadded).

- `partition_dim`: the dimension split over the `axis` group, or None when the parameter is replicated;
- `stride`: the full tensor is `stride` equal blocks along `partition_dim`, each split over the group, and a
  rank's shard is its piece of every block, concatenated (SwiGLU's [gate; up] fc1 has stride 2);
- `axis`: the group the shards are spread over ("tp" for dense layers; expert weights will use "ep"/"etp");
- `unpadded_size`: for vocabulary-parallel tensors, the real vocabulary; the sharded tensor is padded along
  `partition_dim` (Megatron pads to a multiple of make-vocab-size-divisible-by x TP) with zero rows.

It is plain data (no process group inside), so offline tools use it without torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class ShardSpec:
    partition_dim: Optional[int] = None
    stride: int = 1
    axis: str = "tp"
    unpadded_size: Optional[int] = None

    @property
    def is_sharded(self) -> bool:
        return self.partition_dim is not None

    # ---- shapes -----------------------------------------------------------------------------------
    def full_shape(self, local_shape: Sequence[int], axis_size: int) -> tuple[int, ...]:
        """The canonical (unpadded) full shape of a shard of `local_shape` in a group of `axis_size`."""
        shape = list(local_shape)
        if self.is_sharded:
            dim = self.partition_dim
            shape[dim] = self.unpadded_size if self.unpadded_size is not None else shape[dim] * axis_size
        return tuple(shape)

    def local_shape(self, full_shape: Sequence[int], axis_size: int, padded_size: Optional[int] = None) -> tuple[int, ...]:
        """The shard shape for a group of `axis_size`; `padded_size` is the padded length of a vocabulary
        dimension (required when unpadded_size is set)."""
        shape = list(full_shape)
        if not self.is_sharded:
            return tuple(shape)
        dim = self.partition_dim
        if self.unpadded_size is not None:
            if padded_size is None:
                raise ValueError("a vocabulary-parallel ShardSpec needs the padded size to give a local shape")
            shape[dim] = padded_size
        if shape[dim] % (axis_size * self.stride) != 0:
            raise ValueError(f"dimension {dim} of size {shape[dim]} does not split into {self.stride} block(s) "
                             f"over {axis_size} ranks")
        shape[dim] //= axis_size
        return tuple(shape)

    # ---- cutting and joining ----------------------------------------------------------------------
    def shard(self, full: torch.Tensor, rank: int, axis_size: int, local_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Group member `rank`'s shard of the canonical full tensor (padding vocabulary rows with zeros).
        `local_shape` (the shard's shape) gives the padded size of a vocabulary-parallel tensor."""
        if not self.is_sharded:
            return full
        dim = self.partition_dim
        if self.unpadded_size is not None:
            if local_shape is None:
                raise ValueError("sharding a vocabulary-parallel tensor needs the local (padded) shape")
            padded = local_shape[dim] * axis_size
            pad_shape = list(full.shape)
            pad_shape[dim] = padded - full.shape[dim]
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
        blocks = torch.chunk(full, self.stride, dim=dim)
        return torch.cat([torch.chunk(block, axis_size, dim=dim)[rank] for block in blocks], dim=dim).contiguous()

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The canonical full tensor from every member's shard (group order); the inverse of `shard`."""
        if not self.is_sharded:
            return shards[0]
        dim = self.partition_dim
        per_rank = [torch.chunk(shard, self.stride, dim=dim) for shard in shards]
        full = torch.cat([torch.cat([pieces[i] for pieces in per_rank], dim=dim) for i in range(self.stride)], dim=dim)
        if self.unpadded_size is not None:
            full = full.narrow(dim, 0, self.unpadded_size)
        return full.contiguous()

    # ---- metadata.json (the keys checkpoints have always used) -------------------------------------
    def to_json(self) -> dict:
        return {"tensor_model_parallel": self.is_sharded,
                "partition_dim": -1 if self.partition_dim is None else self.partition_dim,
                "partition_stride": self.stride, "unpadded_size": self.unpadded_size, "shard_axis": self.axis}

    @classmethod
    def from_json(cls, values: dict) -> "ShardSpec":
        sharded = bool(values.get("tensor_model_parallel", False))
        return cls(partition_dim=int(values["partition_dim"]) if sharded else None,
                   stride=int(values.get("partition_stride", 1)) if sharded else 1,
                   axis=values.get("shard_axis", "tp"),
                   unpadded_size=None if values.get("unpadded_size") is None else int(values["unpadded_size"]))


REPLICATED = ShardSpec()


def shard_spec_of(param: torch.Tensor) -> ShardSpec:
    """The ShardSpec a layer attached to `param` (replicated when none was)."""
    return getattr(param, "shard_spec", REPLICATED)


def set_shard_spec(param: torch.Tensor, spec: ShardSpec) -> None:
    param.shard_spec = spec


def reduced_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient of `param` that this rank holds and later reductions (sequence-parallel, tied embedding)
    act on: under ZeRO-2 the flat piece of it in this rank's DP shard (`main_grad_shard`, set once DDP's
    reduce-scatter is done; equal pieces on every rank of a TP or embedding group, whose buffers share one
    layout), else DDP's `main_grad`, else autograd's `.grad`."""
    for attribute in ("main_grad_shard", "main_grad", "grad"):
        grad = getattr(param, attribute, None)
        if grad is not None:
            return grad
    return None
