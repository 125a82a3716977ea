"""Exponential moving average of model weights, the weights one samples from."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after each optimizer step, with d = min(decay, (1 + n)/(10 + n))
    so early averages are not dominated by the random initialisation  [Ho et al. 2020, App. B;
    warm-up as in TensorFlow's ExponentialMovingAverage with ``num_updates``].
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.model.load_state_dict(state["model"])
