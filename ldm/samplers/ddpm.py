"""DDPM ancestral sampling  [Ho et al. 2020, Algorithm 2]."""

from __future__ import annotations

from typing import Literal

import torch

from ..diffusion import Prediction, posterior_coefficients
from ..schedule import NoiseSchedule, Spacing
from .common import Model, SamplerLoop, StepRecord, alpha_bars, predict, randn


@torch.no_grad()
def ddpm(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    num_inference_steps: int | None = None,
    spacing: Spacing = "leading",
    prediction: Prediction = "eps",
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small",
    cond: torch.Tensor | None = None,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> SamplerLoop:
    """Ancestral sampling: x_s ~ p(x_s | x_t) = q(x_s | x_t, x̂_0) with x̂_0 from the model.

    Symbols: t the current timestep, s the next visited one (t − 1 over all T steps),
    ᾱ_t, ᾱ_s (ᾱ = 1 after the last step), x̂_0 the model's estimate.
      1. x̂_0, ε̂ = model(x_t, t)                                            (optionally clip x̂_0)
      2. μ = √ᾱ_s β_{t|s} / (1 − ᾱ_t) · x̂_0 + √α_{t|s} (1 − ᾱ_s) / (1 − ᾱ_t) · x_t   [Eq. 7]
      3. x_s = μ + σ_t z,  z ~ N(0, I), σ_t² = β̃_{t|s} ("fixed_small") or β_{t|s} ("fixed_large");
         no noise on the last step.
    With fewer than T steps this is the "respaced" DDPM of Nichol & Dhariwal 2021, §4:
    β_{t|s} = 1 − ᾱ_t/ᾱ_s. ``timesteps`` overrides the visited steps (img2img starts part-way).
    Yields one ``StepRecord`` per step.
    Shapes: x_T (B, C, H, W).
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown variance {variance!r}; known: fixed_small, fixed_large")
    if timesteps is None:
        timesteps = schedule.timesteps(num_inference_steps or schedule.num_train_timesteps, spacing)
    ab, ab_next = alpha_bars(schedule, timesteps)
    x = x_T
    for i, t in enumerate(timesteps.tolist()):
        a_t, a_s = ab[i].to(x.device, torch.float64), ab_next[i].to(x.device, torch.float64)
        x0_pred, _ = predict(model, prediction, x, t, cond, a_t.to(x.dtype), clip_x0)
        coef_x0, coef_xt, var_small = (c.to(x.dtype) for c in posterior_coefficients(a_t, a_s))
        mean = coef_x0 * x0_pred + coef_xt * x
        if i < len(timesteps) - 1:
            var = var_small if variance == "fixed_small" else (1 - a_t / a_s).to(x.dtype)
            x_prev = mean + var.sqrt() * randn(x.shape, generator, x.device, x.dtype)
        else:
            x_prev = mean
        yield StepRecord(i, t, x, x0_pred, x_prev)
        x = x_prev
