"""Noise-level (σ) schedules for the σ-space samplers: where between σ_max and σ_min the S steps fall.

σ = √((1 − ᾱ)/ᾱ) is the noise level of the VE variable x_σ = x_t/√ᾱ = x_0 + σ ε  [Karras et al. 2022, §2]. A
schedule here spaces σ directly; the model, trained on timesteps, is then asked at the t whose σ(t) is each σ_i
(``sigma_to_t``), usually between two training steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..schedule import NoiseSchedule

SigmaSchedule = Literal["karras", "exponential", "beta"]


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n − 1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … n − 1  [Karras et al. 2022, Eq. 5].

    ρ = 7 (the paper's choice) crowds the steps towards σ_min, where the image's detail is decided. Float64, (n,).
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """σ_i = exp(log σ_max + i/(n − 1) · (log σ_min − log σ_max)): uniform in log σ, i.e. in the half-log-SNR
    λ = −log σ that DPM-Solver steps in (its "uniform logSNR" steps  [Lu et al. 2022, "DPM-Solver"]); Eq. 5 as ρ → ∞.
    Float64, (n,)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def beta_sigmas(sigma_max: float, sigma_min: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """σ_i = σ_min + F⁻¹(1 − i/(n − 1)) · (σ_max − σ_min), F the Beta(α, β) CDF  [Lee et al. 2024, "Beta Sampling
    is All You Need"]. α = β = 0.6 < 1 puts more steps near both ends, where the image's layout and its detail are
    decided, than in the middle. Float64, (n,)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    ppf = torch.tensor([_beta_ppf(1 - float(p), alpha, beta) for p in ramp], dtype=torch.float64)
    return sigma_min + ppf * (sigma_max - sigma_min)


SCHEDULES = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}
SIGMA_SCHEDULES: tuple[str, ...] = tuple(SCHEDULES)


def sigma_schedule(name: str, sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """The named schedule's n noise levels from σ_max down to σ_min (float64)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown sigma schedule {name!r}; known: {', '.join(SIGMA_SCHEDULES)}")
    return SCHEDULES[name](float(sigma_max), float(sigma_min), n)


def sigma_to_t(schedule: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each σ: linear in log σ between the two training steps around it, clamped to
    [0, T − 1] (diffusers' and k-diffusion's ``_sigma_to_t``, so the model is asked where they ask it). Float64."""
    ab = schedule.alpha_bar_f64
    log_sigmas = ((1 - ab) / ab).sqrt().log()  # increasing in t
    log_sigma = sigmas.to(torch.float64).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return low + w


def _beta_ppf(p: float, a: float, b: float) -> float:
    """F⁻¹(p) of Beta(a, b), by bisection on the regularized incomplete beta function (to float64 precision)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _betainc(a, b, mid) < p else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the Beta(a, b) CDF, by its continued fraction (modified Lentz)  [DLMF 8.17.22; Numerical Recipes
    §6.4]; the fraction converges fast for x < (a + 1)/(a + b + 2), so beyond it use I_x(a, b) = 1 − I_{1−x}(b, a)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(500):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)
