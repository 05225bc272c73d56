"""Learning-rate and weight-decay schedules with Megatron's semantics (OptimizerParamScheduler).

Steps are whatever unit the caller counts in: iterations (step(1) per iteration) or samples
(step(global_batch_size) per iteration, with warmup/decay lengths given in samples), as in Megatron.
The LR is written to every param group as lr * lr_mult, the weight decay as wd * wd_mult (0 for biases
and norms), so the scheduler never undoes the optimizer's no-decay group.
"""
from __future__ import annotations

import math
from typing import Optional


class OptimizerParamScheduler:
    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float, lr_warmup_steps: int,
                 lr_decay_steps: int, lr_decay_style: str, start_wd: Optional[float] = None,
                 end_wd: Optional[float] = None, wd_incr_steps: Optional[int] = None, wd_incr_style: str = "constant",
                 use_checkpoint_opt_param_scheduler: bool = True, override_opt_param_scheduler: bool = False,
                 wsd_decay_steps: Optional[int] = None, lr_wsd_decay_style: Optional[str] = None):
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = float(init_lr), float(max_lr), float(min_lr)
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"--min-lr {min_lr} must be in [0, --lr {max_lr}]")
        if init_lr > max_lr:
            raise ValueError(f"initial LR {init_lr} must not exceed --lr {max_lr}")
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        if lr_decay_steps <= 0 or lr_warmup_steps >= lr_decay_steps and lr_decay_style != "constant":
            raise ValueError(f"--lr-decay-iters/samples ({lr_decay_steps}) must exceed the warmup ({lr_warmup_steps})")
        if lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
            raise ValueError(f"--lr-decay-style: unknown {lr_decay_style!r}")
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = wsd_decay_steps
        self.lr_wsd_decay_style = lr_wsd_decay_style or "exponential"
        if lr_decay_style == "WSD" and not wsd_decay_steps:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or samples)")
        # Weight decay: default constant at the optimizer's configured value.
        base_wd = max((g["weight_decay"] / g["wd_mult"] for g in optimizer.param_groups if g.get("wd_mult", 1.0) > 0),
                      default=0.0)
        self.start_wd = base_wd if start_wd is None else float(start_wd)
        self.end_wd = self.start_wd if end_wd is None else float(end_wd)
        self.wd_incr_steps = wd_incr_steps if wd_incr_steps is not None else lr_decay_steps
        self.wd_incr_style = wd_incr_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    def get_wd(self) -> float:
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        elif self.wd_incr_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        else:
            raise ValueError(f"unknown weight-decay increment style {self.wd_incr_style!r}")
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: Optional[dict] = None) -> float:
        """The LR (before lr_mult) at the current step, Megatron's formula."""
        group = param_group or {}
        max_lr, min_lr = group.get("max_lr", self.max_lr), group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * self.num_steps / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup, steps = max(self.lr_warmup_steps, 1), max(self.num_steps, 1)
            return max(min_lr, max_lr * math.sqrt(warmup) / math.sqrt(steps))
        decay_ratio = (self.num_steps - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        else:  # WSD: constant, then a final decay over wsd_decay_steps
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            if self.num_steps <= anneal_start:
                coeff = 1.0
            else:
                ratio = (self.num_steps - anneal_start) / self.wsd_decay_steps
                if self.lr_wsd_decay_style == "linear":
                    coeff = 1.0 - ratio
                elif self.lr_wsd_decay_style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
                else:  # exponential
                    coeff = 2.0 * math.pow(0.5, ratio) - 1.0
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "lr_warmup_steps": self.lr_warmup_steps, "num_steps": self.num_steps,
                "lr_decay_style": self.lr_decay_style, "lr_decay_steps": self.lr_decay_steps, "min_lr": self.min_lr,
                "start_wd": self.start_wd, "end_wd": self.end_wd, "wd_incr_style": self.wd_incr_style,
                "wd_incr_steps": self.wd_incr_steps}

    def _check_and_set(self, class_value, saved_value, name: str):
        """Megatron: --override-opt-param-scheduler keeps the class value; otherwise the checkpoint's
        value wins when --use-checkpoint-opt_param-scheduler, else they must agree."""
        if self.override_opt_param_scheduler:
            return class_value
        if not self.use_checkpoint_opt_param_scheduler and class_value != saved_value:
            raise ValueError(f"OptimizerParamScheduler: {name} is {class_value} but the checkpoint has {saved_value}; "
                             "pass --use-checkpoint-opt_param-scheduler or --override-opt_param-scheduler")
        return saved_value

    def load_state_dict(self, state: dict) -> None:
        self.max_lr = self._check_and_set(self.max_lr, state["max_lr"], "learning rate")
        self.min_lr = self._check_and_set(self.min_lr, state["min_lr"], "minimum learning rate")
        self.lr_warmup_steps = self._check_and_set(self.lr_warmup_steps, state["lr_warmup_steps"], "warmup steps")
        self.lr_decay_steps = self._check_and_set(self.lr_decay_steps, state["lr_decay_steps"], "decay steps")
        self.lr_decay_style = self._check_and_set(self.lr_decay_style, state["lr_decay_style"], "decay style")
        self.start_wd = self._check_and_set(self.start_wd, state["start_wd"], "start weight decay")
        self.end_wd = self._check_and_set(self.end_wd, state["end_wd"], "end weight decay")
        self.wd_incr_steps = self._check_and_set(self.wd_incr_steps, state["wd_incr_steps"], "weight decay incr steps")
        self.wd_incr_style = self._check_and_set(self.wd_incr_style, state["wd_incr_style"], "weight decay incr style")
        self.num_steps = 0
        self.step(increment=state["num_steps"])
