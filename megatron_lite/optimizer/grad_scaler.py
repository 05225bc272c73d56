"""Loss scalers for --fp16 (Megatron's semantics): a static scale, or a dynamic one that halves after
`hysteresis` overflowing iterations and doubles after `loss_scale_window` clean ones."""
from __future__ import annotations

import torch


class ConstantGradScaler:
    def __init__(self, initial_scale: float):
        self._scale = torch.tensor([float(initial_scale)])

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return 1.0 / self._scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self._scale.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._scale = state["scale"].clone().float().reshape(1)


class DynamicGradScaler(ConstantGradScaler):
    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        if not (min_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval > 0 and hysteresis > 0):
            raise ValueError("loss scaler: need --min-loss-scale > 0, --loss-scale-window > 0 and --hysteresis > 0")
        self.min_scale = torch.tensor([float(min_scale)])
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            # An overflow restarts the clean-iteration count; the scale drops only after `hysteresis` of them
            # (a single spike should not cost a factor of two).
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self._scale.clone(), "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._growth_tracker = state["growth_tracker"]
        self._hysteresis_tracker = state["hysteresis_tracker"]
