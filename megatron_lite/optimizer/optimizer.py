"""Megatron's optimizer wrapper: fp32 main parameters, loss scaling, global-norm clipping, and (with
--use-distributed-optimizer) sharded main parameters and optimizer states.

One class covers all cases because they differ only in *which* slice of each parameter this rank steps:
- not distributed: every local parameter, whole;
- distributed: for each DDP bucket, the contiguous shard [dp_rank * n/dp, (dp_rank+1) * n/dp) of it, i.e.
  a flat slice of each parameter that overlaps the shard (see distrib_optimizer.shard_slices).
Each stepped slice is a `MainParam`: an fp32 tensor the inner torch optimizer updates, plus where its
gradient comes from and where the result goes back to. When the model parameter is already fp32 the
main parameter is a *view* of it (no copy, as in Megatron: 16 bytes/param, not 20).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megatron_lite.config import Config
from megatron_lite.distributed.model_chunk import ModelChunk, as_model_chunks
from megatron_lite.kernels.adam import build_adam, select_adam_impl
from megatron_lite.optimizer.distrib_optimizer import gather_parameter_state, shard_slices
from megatron_lite.optimizer.clip_grads import (NonFiniteStepError, any_nonfinite, check_finite_step,
                                                clip_grad_by_total_norm_fp32, count_zeros_fp32, counts_toward_norm,
                                                get_grad_norm_fp32)
from megatron_lite.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron_lite.optimizer.nvme import NvmeStore
from megatron_lite.optimizer.offload import build_host_adam, host_copy, split_for_offload
from megatron_lite.process_groups import ProcessGroups


@dataclass
class MainParam:
    name: str  # global parameter name
    model_param: nn.Parameter
    main: torch.Tensor  # fp32; what the inner optimizer steps
    start: int  # flat slice [start, end) of the model parameter this main param covers
    end: int
    aliases_model: bool  # main is a view of the model parameter (fp32 params): no copy back needed
    location: str = "device"  # where main and its optimizer states live: "device", "host" (CPU offload)
    model_slice: Optional[torch.Tensor] = None  # the model's values of [start, end) at rest (chunk.param_slice)

    def model_grad(self) -> Optional[torch.Tensor]:
        shard = getattr(self.model_param, "main_grad_shard", None)
        if shard is not None:  # ZeRO-2: the reduced piece of this rank's shard (which holds [start, end))
            offset = self.model_param.main_grad_shard_start
            return shard[self.start - offset:self.end - offset]
        grad = getattr(self.model_param, "main_grad", None)
        if grad is None:
            grad = self.model_param.grad
        return None if grad is None else grad.view(-1)[self.start:self.end]


def _main_param(name: str, param: nn.Parameter, start: int, end: int, location: str, flat: torch.Tensor) -> MainParam:
    """The fp32 main copy of param's flat [start, end), whose model values at rest are `flat` (a view of the
    parameter, or of its ZeRO-3 shard): a view for fp32 params on the device, a host copy when offloaded
    (optimizer/offload.py), else an fp32 copy."""
    if location == "host":
        return MainParam(name, param, host_copy(flat), start, end, False, location, flat)
    if location == "disk":  # NvmeStore maps its main (and fills it from the model) once every slice is known
        return MainParam(name, param, None, start, end, False, location, flat)
    aliases = param.dtype == torch.float32
    return MainParam(name, param, flat if aliases else flat.float(), start, end, aliases, location, flat)


class MegatronOptimizer:
    """The optimizer for all model chunks of this rank. See get_megatron_optimizer."""

    def __init__(self, config: Config, model_chunks: list[nn.Module], groups: Optional[ProcessGroups] = None):
        self.config = config
        self.model_chunks: list[ModelChunk] = as_model_chunks(model_chunks)
        self.groups = groups or ProcessGroups.single()
        opt = config.optimizer
        self.distributed = config.parallel.sharding_strategy != "no_shard"
        if self.distributed and not all(c.shards_optimizer_state for c in self.model_chunks):
            raise ValueError("--use-distributed-optimizer: wrap every model chunk in DistributedDataParallel "
                             "built with the same config first")

        self.main_params: list[MainParam] = []
        for chunk in self.model_chunks:
            chunk.finish_param_sync()
            names = {id(p): n for n, p in chunk.module.named_parameters()}
            slices = (shard_slices(chunk) if self.distributed else
                      [(p, 0, p.numel()) for p in chunk.parameters() if p.requires_grad])
            for param, start, end in slices:
                self.main_params.append(_main_param(names[id(param)], param, start, end, "device",
                                                    chunk.param_slice(param, start, end)))
        # optimizer/offload.py: the first fraction of the shard lives and steps on the host (or on disk, nvme.py).
        self.offload = "disk" if opt.optimizer_nvme_offload_dir else "host" if opt.optimizer_cpu_offload else None
        if self.offload:
            self.main_params = split_for_offload(self.main_params, opt.optimizer_offload_fraction, self.offload,
                                                 lambda m, start, end, where: _main_param(
                                                     m.name, m.model_param, start, end, where,
                                                     m.model_slice[start - m.start:end - m.start]))
        self.optimizer = self._build_inner([m for m in self.main_params if m.location == "device"])
        self.host_optimizer = (self._build_inner([m for m in self.main_params if m.location == "host"], host=True)
                               if self.offload == "host" else None)
        self.nvme = None
        if self.offload == "disk":
            self.nvme = NvmeStore([m for m in self.main_params if m.location == "disk"], opt.optimizer_nvme_offload_dir,
                                  self.groups.world.rank, opt.optimizer_offload_chunk_mb,
                                  dict(lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                                       weight_decay=opt.weight_decay))
        self.state_keys = ("exp_avg", "exp_avg_sq") if opt.optimizer == "adam" else ("momentum_buffer",)
        self.num_steps = 0
        for m in self.main_params:  # allocate states now: memory is visible up front, and set_parameter_state works
            if m.location != "disk":  # (the disk store made its own)
                self._init_state(m)

        self.grad_scaler = None
        if opt.fp16:
            self.grad_scaler = (ConstantGradScaler(opt.loss_scale) if opt.loss_scale is not None else
                                DynamicGradScaler(opt.initial_loss_scale, opt.min_loss_scale,
                                                  growth_interval=opt.loss_scale_window, hysteresis=opt.hysteresis))
        # Statistics: non-distributed, the DP replicas agree, so model-parallel ranks suffice; distributed,
        # each DP rank holds a disjoint shard, so sum over every rank (TP x PP x DP x CP = the world).
        self._stat_groups = [self.groups.world] if self.distributed else [self.groups.mp]
        self._inf_groups = [self.groups.world]  # every TP / PP / DP rank skips an overflowing step together

    def _build_inner(self, main_params: list[MainParam], host: bool = False) -> torch.optim.Optimizer:
        """The torch optimizer over `main_params`: decay and no-decay groups (possibly empty)."""
        opt = self.config.optimizer
        # Weight decay only on matrices (2+ dims), never on biases or norm weights (Megatron, nanoGPT).
        # wd_mult / lr_mult are what the LR scheduler multiplies in.
        decay = [m.main for m in main_params if m.model_param.dim() >= 2]
        no_decay = [m.main for m in main_params if m.model_param.dim() < 2]
        groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0, "weight_decay": opt.weight_decay},
                  {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0, "weight_decay": 0.0}]
        hyper = dict(lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps, weight_decay=opt.weight_decay)
        if host:
            return build_host_adam(groups, **hyper)
        if opt.optimizer == "adam":
            # TE/Apex FusedAdam, torch's fused or foreach AdamW (--no-fused-adam: the per-tensor loop);
            # same update and state keys in all (kernels/adam.py).
            device = main_params[0].main.device.type if main_params else None
            self.adam_impl = select_adam_impl(opt.use_fused_adam, device, self.config.model.transformer_impl)
            return build_adam(groups, self.adam_impl, **hyper)
        if opt.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.sgd_momentum, weight_decay=opt.weight_decay,
                                   foreach=bool(opt.use_fused_adam))
        raise ValueError(f"--optimizer: unknown {opt.optimizer!r}. Use adam or sgd.")

    def _inner(self, m: MainParam) -> torch.optim.Optimizer:
        return self.host_optimizer if m.location == "host" else self.optimizer

    # ---- the training-loop interface -------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """Every param group (device, then host with --optimizer-cpu-offload): the LR scheduler sets them all."""
        groups = list(self.optimizer.param_groups)
        if self.host_optimizer is not None:
            groups += self.host_optimizer.param_groups
        if self.nvme is not None:
            groups += self.nvme.param_groups
        return groups

    def get_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def get_loss_scale(self) -> torch.Tensor:
        return self.grad_scaler.scale if self.grad_scaler is not None else torch.tensor([1.0])

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.get_loss_scale().to(loss.device) if self.grad_scaler is not None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        for m in self.main_params:
            m.main.grad = None

    @torch.no_grad()
    def step(self, nonfinite_loss: bool = False) -> tuple[bool, Optional[float], Optional[int]]:
        """Unscale, skip on inf/nan (all ranks together), clip, step, write back, all-gather (distributed).

        Returns (update_successful, grad_norm, num_zeros_in_grad); the last two are None for a skipped step,
        and num_zeros_in_grad is None unless --log-num-zeros-in-grad. With --check-for-nan-in-loss-and-grad
        a non-finite grad norm, or `nonfinite_loss` on any rank, raises NonFiniteStepError on every rank
        before anything is updated (fp16: the loss scaler's overflow skip comes first).
        """
        for chunk in self.model_chunks:
            chunk.finish_param_sync()  # ZeRO-3: parameters at rest (a state dict may have gathered them)
        # fp32 gradient of each main param, on the device (offloaded slices go to the host only to step).
        device_grads = {}
        for m in self.main_params:
            grad = m.model_grad()
            if grad is not None:
                device_grads[id(m)] = grad if grad.dtype == torch.float32 else grad.float()
        grads = list(device_grads.values())

        if self.grad_scaler is not None:
            inv_scale = float(self.grad_scaler.inv_scale.item())
            for grad in grads:
                grad.mul_(inv_scale)
            found_inf = any_nonfinite(grads, groups=self._inf_groups)
            self.grad_scaler.update(found_inf)
            if found_inf:
                self._drop_main_grads()
                return False, None, None

        counted_params = [m for m in self.main_params
                          if id(m) in device_grads and counts_toward_norm(m.model_param, self.groups)]
        grad_norm = self._grad_norm(counted_params, device_grads)
        if self.config.training.check_for_nan_in_loss_and_grad:
            try:
                check_finite_step(nonfinite_loss, grad_norm, self.groups.world)
            except NonFiniteStepError:
                self._drop_main_grads()
                raise
        if self.config.optimizer.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(grads, self.config.optimizer.clip_grad, grad_norm)
        # Megatron counts zeros only on request: it is a full extra pass over every gradient.
        num_zeros = self._count_zeros(counted_params, device_grads) if self.config.logging.log_num_zeros_in_grad else None

        for m in self.main_params:  # host slices: the clipped gradient is copied to the host (offload.py)
            grad = device_grads.get(id(m))
            if m.location != "disk":  # (disk slices take their gradient chunk by chunk in nvme.step)
                m.main.grad = None if grad is None else (grad if m.location == "device" else host_copy(grad))
        self.optimizer.step()
        if self.host_optimizer is not None:
            self.host_optimizer.step()
        if self.nvme is not None:
            self.nvme.step(device_grads, self.num_steps)
        self.num_steps += 1
        self._drop_main_grads()
        for m in self.main_params:
            if not m.aliases_model:
                m.model_slice.copy_(m.main)
        if self.distributed:
            for chunk in self.model_chunks:
                chunk.start_param_sync()  # async with --overlap-param-gather: waited for in forward
        return True, grad_norm, num_zeros

    def _split_experts(self, counted: list[MainParam], grads: dict) -> list[tuple[list[torch.Tensor], list]]:
        """(grads, groups) to reduce statistics over. Not distributed, MoE experts are replicated over their
        expert-DP group, not over DP: their shards are summed over ETP x EP x PP instead of TP x PP."""
        if self.distributed or not self.config.moe.is_moe:
            return [([grads[id(m)] for m in counted], self._stat_groups)]
        expert = [grads[id(m)] for m in counted if getattr(m.model_param, "expert_parallel", False)]
        dense = [grads[id(m)] for m in counted if not getattr(m.model_param, "expert_parallel", False)]
        return [(dense, self._stat_groups), (expert, [self.groups.tp_ep_pp])]

    def _grad_norm(self, counted: list[MainParam], grads: dict) -> float:
        parts = self._split_experts(counted, grads)
        if len(parts) == 1:
            return get_grad_norm_fp32(*parts[0])
        return math.sqrt(sum(get_grad_norm_fp32(part, groups) ** 2 for part, groups in parts))

    def _count_zeros(self, counted: list[MainParam], grads: dict) -> int:
        return sum(count_zeros_fp32(part, groups) for part, groups in self._split_experts(counted, grads))

    def close(self) -> None:
        """Release what outlives the process otherwise: the NVMe offload files (a clean exit does it too)."""
        if self.nvme is not None:
            self.nvme.close()

    def _drop_main_grads(self) -> None:
        # For fp32 params main is the parameter itself: a leftover .grad would be accumulated into by the
        # next backward and then added to main_grad a second time.
        for m in self.main_params:
            m.main.grad = None

    # ---- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps,
                "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]}
        # (host groups, with offload, carry the same hyper-parameters as the device groups they mirror)

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = state["num_steps"]
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        for index, group in enumerate(self.param_groups):  # host groups mirror the device decay/no-decay pair
            group.update(state["param_groups"][index % len(state["param_groups"])])
        for m in self.main_params:
            if m.location != "disk" and "step" in self._inner(m).state[m.main]:
                self._inner(m).state[m.main]["step"].fill_(float(self.num_steps))

    def get_parameter_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{global name: {"param": fp32 main param, "exp_avg", "exp_avg_sq" | "momentum_buffer"}}, each in the
        TP-local shape of the parameter. With the distributed optimizer the shards are all-gathered over DP
        (a collective: call on every DP rank) and EVERY DP rank returns the full dict."""
        keys = ("param",) + self.state_keys
        if self.distributed:
            owned = [(m.model_param, m.start, m.end, lambda key, m=m: self.state_tensor(m, key)) for m in self.main_params]
            return gather_parameter_state(self.model_chunks, owned, keys)
        return {m.name: {key: self.state_tensor(m, key).detach().clone().view(m.model_param.shape) for key in keys}
                for m in self.main_params}

    def set_parameter_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of get_parameter_state: each rank copies in its own (TP-local, DP-shard) part. The model
        parameters get the (rounded) main values too, so model and main weights agree."""
        for chunk in self.model_chunks:
            chunk.finish_param_sync()
        for m in self.main_params:
            for key, value in states.get(m.name, {}).items():
                if key == "param" or key in self.state_keys:
                    self.state_tensor(m, key).copy_(value.reshape(-1)[m.start:m.end].to(m.main.device))
            if not m.aliases_model:
                m.model_slice.copy_(m.main)
        if self.distributed:
            for chunk in self.model_chunks:
                chunk.start_param_sync(force_sync=True)

    def local_parameter_state(self) -> list[tuple[str, int, int, dict[str, torch.Tensor]]]:
        """(global name, start, end, {"param", state keys: flat fp32 tensor}) for every slice this rank steps
        (the distributed optimizer's DP slices; whole parameters otherwise), without communication: what a
        sharded checkpoint writes. The tensors are the live states (copy before they change)."""
        keys = ("param",) + self.state_keys
        return [(m.name, m.start, m.end, {key: self.state_tensor(m, key).detach().view(-1) for key in keys})
                for m in self.main_params]

    @torch.no_grad()
    def set_local_parameter_state(self, state_for) -> None:
        """Inverse of local_parameter_state: `state_for(name, start, end, key)` returns the flat [start, end)
        of that state (TP-local flat indexing). The model parameters get the (rounded) main values too."""
        for chunk in self.model_chunks:
            chunk.finish_param_sync()  # ZeRO-3: loaded weights into the shards first, which main then overwrites
        for m in self.main_params:
            for key in ("param",) + self.state_keys:
                self.state_tensor(m, key).copy_(state_for(m.name, m.start, m.end, key).reshape(-1))
            if not m.aliases_model:
                m.model_slice.copy_(self.state_tensor(m, "param"))
        if self.distributed:
            for chunk in self.model_chunks:
                chunk.start_param_sync(force_sync=True)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 main params from the model's (e.g. after loading weights without optimizer state)."""
        for chunk in self.model_chunks:
            chunk.finish_param_sync()
        for m in self.main_params:
            if not m.aliases_model:
                m.main.copy_(m.model_slice)

    def state_tensor(self, m: MainParam, key: str) -> torch.Tensor:
        """The tensor behind state `key` ("param" = the fp32 main param, or an optimizer state) of `m`."""
        if m.location == "disk":
            return self.nvme.state(m, key)
        return m.main if key == "param" else self._inner(m).state[m.main][key]

    def _init_state(self, m: MainParam) -> None:
        main = m.main
        state = self._inner(m).state[main]
        if self.config.optimizer.optimizer == "adam":
            # torch's fused kernel wants the step on the parameter's device (others accept either).
            fused = m.location == "host" or getattr(self, "adam_impl", None) == "torch_fused"
            step_device = main.device if fused else None
            state["step"] = torch.tensor(float(self.num_steps), device=step_device)
            state["exp_avg"] = torch.zeros_like(main, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(main, memory_format=torch.preserve_format)
        else:
            # A zero buffer gives the same first step as torch's lazy clone(grad) (dampening 0).
            state["momentum_buffer"] = torch.zeros_like(main, memory_format=torch.preserve_format)
