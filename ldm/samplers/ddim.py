"""DDIM sampling  [Song et al. 2021, "Denoising Diffusion Implicit Models"]."""

from __future__ import annotations

import torch

from ..diffusion import Prediction
from ..schedule import NoiseSchedule, Spacing
from .common import Model, SamplerLoop, StepRecord, alpha_bars, predict, randn


@torch.no_grad()
def ddim(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    final_alpha_bar: float | None = None,
    prediction: Prediction = "eps",
    cond: torch.Tensor | None = None,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> SamplerLoop:
    """The DDIM update from timestep t to the next visited timestep s  [Song et al. 2021, Eq. 12, 16]:

        x_s = √ᾱ_s · x̂_0  +  √(1 − ᾱ_s − σ_t²) · ε̂  +  σ_t z,      z ~ N(0, I)
        σ_t = η · √((1 − ᾱ_s)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_s)

    η = 0 is deterministic (an Euler step of the probability-flow ODE in the variables
    x/√ᾱ and √((1−ᾱ)/ᾱ)); η = 1 makes σ_t² the posterior variance β̃, so η = 1 over all
    T steps is DDPM ancestral sampling. ``final_alpha_bar`` is ᾱ after the last step
    (1 by default; diffusers' ``set_alpha_to_one=False`` means ᾱ_0). No noise on the last
    step. ``timesteps`` overrides the visited steps (img2img starts part-way). Yields one
    ``StepRecord`` per step. Shapes: x_T (B, C, H, W).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if timesteps is None:
        timesteps = schedule.timesteps(num_inference_steps, spacing, steps_offset)
    ab, ab_next = alpha_bars(schedule, timesteps, final_alpha_bar)
    x = x_T
    for i, t in enumerate(timesteps.tolist()):
        a_t, a_s = ab[i].to(x.device, torch.float64), ab_next[i].to(x.device, torch.float64)
        x0_pred, eps_pred = predict(model, prediction, x, t, cond, a_t.to(x.dtype), clip_x0)
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
        dir_xt = (1 - a_s - sigma**2).clamp(min=0).sqrt()
        x_prev = a_s.sqrt().to(x.dtype) * x0_pred + dir_xt.to(x.dtype) * eps_pred
        if eta > 0 and i < len(timesteps) - 1:
            x_prev = x_prev + sigma.to(x.dtype) * randn(x.shape, generator, x.device, x.dtype)
        yield StepRecord(i, t, x, x0_pred, x_prev)
        x = x_prev
