"""Exponential moving average of model weights, the weights one samples from."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after each optimizer step n = 1, 2, …, with

        d_n = min(decay, 1 − (γ + 1)/(n + γ + 2))

    so early averages are not dominated by the random initialisation  [Ho et al. 2020, App. B]. Until ``decay``
    caps it, this is an average of all weights so far, step j weighted about ∝ j^γ: the power-function EMA of
    Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", (1 − 1/n)^(γ+1) for
    large n), which covers about the last n/(γ + 1) steps at any n. γ = 8 is TensorFlow's ExponentialMovingAverage
    warm-up, (1 + n)/(10 + n); a smaller γ averages a longer tail.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, gamma: float = 8.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if not gamma >= 0:
            raise ValueError(f"EMA gamma must be ≥ 0, got {gamma}")
        self.decay, self.gamma = decay, gamma
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, 1 - (self.gamma + 1) / (self.num_updates + self.gamma + 2))
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "gamma": self.gamma, "num_updates": self.num_updates,
                "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.gamma = state.get("gamma", 8.0)  # checkpoints before γ was a setting used 8
        self.model.load_state_dict(state["model"])
