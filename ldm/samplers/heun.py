"""Heun's second-order method in σ-space  [Karras et al. 2022, "Elucidating the Design Space…", Algorithm 2]."""

from __future__ import annotations

import torch

from ..diffusion import Prediction
from ..schedule import NoiseSchedule, Spacing
from .common import Model, SamplerLoop, StepRecord
from .euler import as_timestep, denoise, sigma_steps
from .sigmas import SigmaSchedule


@torch.no_grad()
def heun(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    prediction: Prediction = "eps",
    cond: torch.Tensor | None = None,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    sigmas: SigmaSchedule | None = None,
    begin: int = 0,
) -> SamplerLoop:
    """The probability-flow ODE by Heun's method (the explicit trapezoid rule)  [Karras et al. 2022, Algorithm 2
    with S_churn = 0, as diffusers' ``HeunDiscreteScheduler``].

    Symbols as in ``euler``: x_σ = x_t · √(1 + σ²), d(x_σ, σ) = (x_σ − x̂_0(x_σ, σ))/σ, σ' the next σ.
      1. d  = d(x_σ, σ);                     x̃ = x_σ + (σ' − σ) · d                (an Euler step)
      2. d' = d(x̃, σ');                      x_σ' = x_σ + (σ' − σ) · (d + d')/2    (the correction, if σ' ≠ 0)
    The local error drops from O(h²) to O(h³) for a second model call per step. The last step, to σ' = 0, is
    the Euler step alone (d' would divide by σ' = 0), so S steps cost 2S − 1 model calls. The model is asked
    at t(σ') for the correction: the next step's timestep.

    Takes ``sigma_steps``' plan: ``timesteps`` overrides the visited steps, ``sigmas`` names a σ schedule, ``begin``
    starts it part-way (image-to-image).
    Deterministic: ``generator`` is accepted for a common signature and unused. Yields one ``StepRecord`` per
    step (its x̂_0 is the first call's). Shapes: x_T (B, C, H, W), in model space.
    """
    timesteps, sigmas = sigma_steps(schedule, num_inference_steps, spacing, steps_offset, timesteps, sigmas, begin)
    ts = timesteps.tolist()
    x = x_T
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred, x_sigma, d = denoise(model, prediction, x, t, sigma, cond, clip_x0)
        dt = (sigma_next - sigma).to(x.dtype)
        if sigma_next > 0:
            scale_next = (1 + sigma_next**2).sqrt().to(x.dtype)
            _, _, d_next = denoise(model, prediction, (x_sigma + dt * d) / scale_next, ts[i + 1], sigma_next, cond,
                                   clip_x0)
            d = (d + d_next) / 2
        x_prev = (x_sigma + dt * d) / (1 + sigma_next**2).sqrt().to(x.dtype)
        yield StepRecord(i, as_timestep(t), x, x0_pred, x_prev)
        x = x_prev
