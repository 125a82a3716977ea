"""Euler and Euler-ancestral sampling in σ-space  [Karras et al. 2022, "Elucidating the Design Space…"; k-diffusion]."""

from __future__ import annotations

from functools import partial

import torch

from ..diffusion import Prediction
from ..schedule import NoiseSchedule, Spacing
from .common import Model, SamplerLoop, StepRecord, predict, randn
from .sigmas import SigmaSchedule, sigma_schedule, sigma_to_t


def euler_timesteps(schedule: NoiseSchedule, num_inference_steps: int, spacing: Spacing = "leading",
                    steps_offset: int = 0) -> torch.Tensor:
    """The S timesteps the Euler samplers visit (decreasing), as diffusers' ``EulerDiscreteScheduler`` picks them.

    "leading" and "trailing" are ``schedule.timesteps`` (int64). "linspace" is t_i = i·(T − 1)/(S − 1)
    left unrounded (float64 holding diffusers' float32 values), so t and σ(t) fall between training steps.
    """
    ts = schedule.timesteps(num_inference_steps, spacing, steps_offset)  # also checks S and spacing
    if spacing != "linspace":
        return ts
    T = schedule.num_train_timesteps
    return torch.linspace(0, T - 1, num_inference_steps, dtype=torch.float64).float().double().flip(0)


def sigmas_at(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """σ(t) = √((1 − ᾱ_t)/ᾱ_t), linear in t between training steps (diffusers' ``interpolation_type="linear"``).

    Float64, shape (S,); t may be fractional, within [0, T − 1].
    """
    ab = schedule.alpha_bar_f64
    sigma = ((1 - ab) / ab).sqrt()
    t = timesteps.to(torch.float64).cpu()
    if t.numel() and (t.min() < 0 or t.max() > len(sigma) - 1):
        raise ValueError(f"timesteps must lie in [0, {len(sigma) - 1}], got {t.min().item()} … {t.max().item()}")
    lo = t.floor().long().clamp(max=len(sigma) - 2)
    return sigma[lo] + (t - lo) * (sigma[lo + 1] - sigma[lo])


def sigma_steps(schedule: NoiseSchedule, num_inference_steps: int, spacing: Spacing = "leading", steps_offset: int = 0,
                timesteps: torch.Tensor | None = None, sigmas: SigmaSchedule | None = None, begin: int = 0,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The σ-space samplers' plan: the S timesteps the model is asked at, and σ at each with σ = 0 (the data)
    appended, (S + 1,) float64.

    Without ``sigmas``, σ follows the timesteps (``euler_timesteps``, or the caller's; σ from ``sigmas_at``).
    A named schedule ("karras", "exponential", "beta": ``sigmas.sigma_schedule``) spaces S σ's between σ at the
    first and at the last of the spacing's timesteps, as diffusers' Euler, Heun and LMS schedulers do, and asks the
    model at t(σ) (``sigma_to_t``, fractional). ``begin`` drops the plan's first steps: image-to-image runs the last
    S − begin steps of the S-step plan (diffusers' ``set_begin_index``), starting from x_0 noised to σ_begin.
    """
    if timesteps is None:
        timesteps = euler_timesteps(schedule, num_inference_steps, spacing, steps_offset)
    elif sigmas is not None:
        raise ValueError("pass timesteps or a sigma schedule, not both (a schedule picks its own timesteps)")
    sigma = sigmas_at(schedule, timesteps)
    if sigmas is not None:
        sigma = sigma_schedule(sigmas, sigma[0], sigma[-1], len(timesteps))
        timesteps = sigma_to_t(schedule, sigma)
    if not 0 <= begin < len(timesteps):
        raise ValueError(f"begin must be in [0, {len(timesteps)}), got {begin}")
    return timesteps[begin:], torch.cat([sigma[begin:], torch.zeros(1, dtype=torch.float64)])


def as_timestep(t: float) -> int | float:
    """t as the model and the records get it: an int on a training step, else the fraction."""
    return int(t) if float(t).is_integer() else t


def _at(model: Model, t: float) -> Model:
    """``model``, but fed the timestep t itself when it is fractional ("linspace"): ``predict`` builds int64
    timesteps, while diffusers evaluates the model at the unrounded t (a UNet embeds any real t)."""
    if float(t).is_integer():
        return model
    return lambda x, _, cond: model(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device), cond)


def denoise(model: Model, prediction: Prediction, x: torch.Tensor, t: float, sigma: torch.Tensor, cond,
            clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model at (x_t, t) read in σ-space: (x̂_0, x_σ, d), the one evaluation every σ-space step is made of.

    x_σ = x_t · √(1 + σ²) (x_t in model space: the model sees what it saw in training) and
    d = (x_σ − x̂_0)/σ = dx_σ/dσ, the probability-flow ODE's slope  [Karras et al. 2022, Eq. 1, 3]; = ε̂ unclipped.
    """
    t = as_timestep(t)
    scale = (1 + sigma**2).sqrt()  # x_σ / x_t = 1/√ᾱ
    x0_pred, _ = predict(_at(model, t), prediction, x, int(t), cond, scale.pow(-2).to(x.dtype), clip_x0)
    x_sigma = scale.to(x.dtype) * x
    return x0_pred, x_sigma, (x_sigma - x0_pred) / sigma.to(x.dtype)


@torch.no_grad()
def euler(
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
    ancestral: bool = False,
) -> SamplerLoop:
    """Euler steps of the probability-flow ODE in σ-space  [Karras et al. 2022, Algorithm 2 with S_churn = 0 and
    no second-order correction]; with ``ancestral``, k-diffusion's ``sample_euler_ancestral`` (η = 1).

    Symbols: σ = √((1 − ᾱ)/ᾱ), x_σ = x_t · √(1 + σ²) = x_0 + σ ε (the VE variable), σ' the next σ
    (0 after the last step), x̂_0 the model's estimate, z ~ N(0, I).
      1. x̂_0 = model(x_σ / √(1 + σ²), t)       (the model sees x_t, as in training)
      2. d = (x_σ − x̂_0) / σ                    (dx_σ/dσ  [Karras et al. 2022, Eq. 1, 3]; = ε̂ unclipped)
      3. Euler:     x_σ' = x_σ + (σ' − σ) · d
         ancestral: x_σ' = x_σ + (σ_down − σ) · d + σ_up · z,
                    σ_up = σ' · √(σ² − σ'²) / σ,  σ_down = √(σ'² − σ_up²) = σ'² / σ
    σ_up² is the DDPM posterior variance β̃ in σ-space (β̃/ᾱ_s). So, unclipped and in exact
    arithmetic, Euler is DDIM with η = 0 and Euler ancestral is DDIM with η = 1 on the same timesteps.
    They differ from ``ddim`` in the timesteps (``euler_timesteps``; σ interpolated, see ``sigmas_at``)
    and in rounding. The ancestral noise is drawn on every step, including the last (where σ_up = 0),
    so the generator advances as diffusers' does.

    x_T, the records and the result are in model space (x_t = √ᾱ x_0 + √(1 − ᾱ) ε); x_σ stays inside.
    (diffusers starts "linspace"/"trailing" runs from x_T · σ_max, not x_T · √(1 + σ_max²).)
    ``timesteps`` overrides the visited steps (img2img starts part-way; fractional t allowed); ``sigmas`` names
    a σ schedule instead ("karras", "exponential", "beta"; see ``sigma_steps``); ``begin`` starts that plan part-way.
    Yields one ``StepRecord`` per step. Shapes: x_T (B, C, H, W).
    """
    timesteps, sigmas = sigma_steps(schedule, num_inference_steps, spacing, steps_offset, timesteps, sigmas, begin)
    x = x_T
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred, x_sigma, d = denoise(model, prediction, x, t, sigma, cond, clip_x0)
        if ancestral:
            sigma_up = sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma
            x_sigma = x_sigma + (sigma_next**2 / sigma - sigma).to(x.dtype) * d  # σ_down = σ'²/σ, no cancellation
            x_sigma = x_sigma + sigma_up.to(x.dtype) * randn(x.shape, generator, x.device, x.dtype)
        else:
            x_sigma = x_sigma + (sigma_next - sigma).to(x.dtype) * d
        x_prev = x_sigma / (1 + sigma_next**2).sqrt().to(x.dtype)
        yield StepRecord(i, as_timestep(t), x, x0_pred, x_prev)
        x = x_prev


# The same loop with the noise split on: one definition, two registry entries.
euler_ancestral = partial(euler, ancestral=True)
