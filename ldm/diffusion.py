"""The forward process q(x_t | x_0), its posterior, and the three things a model can predict.

Symbols: x_0 data, x_t noised sample, ε ~ N(0, I) the noise, ᾱ_t from the schedule
(``alpha_bar_t`` below is ᾱ already gathered to broadcast against x, see
``ldm.schedule.gather``). Conversions take ᾱ rather than t, so samplers that skip
steps (DDIM, respaced DDPM) reuse them unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from .schedule import NoiseSchedule, gather

# Any denoiser: (x_t (B, C, H, W), t (B,), cond or None) → prediction in its parametrisation. ``cond`` is whatever the
# model reads: class labels, a text context, or a ``ldm.conditioning.Conditioning`` record.
Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Prediction = Literal["eps", "x0", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) in one step.

        x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,  ε ~ N(0, I)     [Ho et al. 2020, Eq. 4]

    Shapes: x0, noise (B, C, H, W); t (B,) int64.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    return gather(schedule.sqrt_alpha_bar, t, x0) * x0 + gather(schedule.sqrt_one_minus_alpha_bar, t, x0) * noise


def posterior_coefficients(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor):
    """Coefficients of q(x_s | x_t, x_0) for any s < t (s = t−1 in DDPM, s = the next sampled step when skipping).

    With α_{t|s} = ᾱ_t / ᾱ_s and β_{t|s} = 1 − α_{t|s}:
        μ̃ = √ᾱ_s β_{t|s} / (1 − ᾱ_t) · x_0 + √α_{t|s} (1 − ᾱ_s) / (1 − ᾱ_t) · x_t
        β̃ = (1 − ᾱ_s) / (1 − ᾱ_t) · β_{t|s}                    [Ho et al. 2020, Eq. 6–7]
    Returns (coef_x0, coef_xt, variance), each shaped like its inputs.
    """
    alpha_t_given_s = alpha_bar_t / alpha_bar_prev
    beta_t_given_s = 1 - alpha_t_given_s
    coef_x0 = alpha_bar_prev.sqrt() * beta_t_given_s / (1 - alpha_bar_t)
    coef_xt = alpha_t_given_s.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t_given_s
    return coef_x0, coef_xt, variance


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean and variance of q(x_{t−1} | x_t, x_0)  [Ho et al. 2020, Eq. 6–7].

    Shapes: x0, x_t (B, C, H, W); t (B,). Returns (mean (B, C, H, W), variance (B, 1, 1, 1)).
    """
    ab = schedule.alpha_bar_f64
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    coef_x0, coef_xt, variance = (
        c.to(x_t.dtype) for c in posterior_coefficients(gather(ab, t, x_t, torch.float64), gather(ab_prev, t, x_t, torch.float64))
    )
    return coef_x0 * x0 + coef_xt * x_t, variance


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t) · ε̂) / √ᾱ_t   (Eq. 4 solved for x_0)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t − √ᾱ_t · x̂_0) / √(1 − ᾱ_t)   (Eq. 4 solved for ε)."""
    return (x_t - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0     [Salimans & Ho 2022, §4, "v-prediction"]."""
    return alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0


def x0_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar_t: torch.Tensor):
    """Invert v: x̂_0 = √ᾱ_t · x_t − √(1 − ᾱ_t) · v̂,  ε̂ = √(1 − ᾱ_t) · x_t + √ᾱ_t · v̂   [Salimans & Ho 2022, App. D]."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    return a * x_t - s * v, s * x_t + a * v


def split_prediction(prediction: Prediction, model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor):
    """Turn a model's output of any parametrisation into the pair (x̂_0, ε̂) every sampler works with."""
    if prediction == "eps":
        return x0_from_eps(x_t, model_output, alpha_bar_t), model_output
    if prediction == "x0":
        return model_output, eps_from_x0(x_t, model_output, alpha_bar_t)
    if prediction == "v":
        return x0_eps_from_v(x_t, model_output, alpha_bar_t)
    raise ValueError(f"unknown prediction type {prediction!r}; known: {', '.join(PREDICTIONS)}")


def training_target(prediction: Prediction, x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """What a model of the given parametrisation should output for (x_0, ε)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_target(x0, eps, alpha_bar_t)
    raise ValueError(f"unknown prediction type {prediction!r}; known: {', '.join(PREDICTIONS)}")
