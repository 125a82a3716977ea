"""Noise schedules: the numbers β_t, α_t, ᾱ_t that define a diffusion process.

Timestep convention (used everywhere in ldm): t is 0-indexed, t ∈ [0, T) with
T = ``num_train_timesteps``. x_0 is the data; ᾱ_{-1} = 1 by definition, so the
first noising step goes from the data to x_0's noisier self with variance β_0.

Everything is computed in float64 (ᾱ is a long cumulative product whose tail
loses precision in float32) and stored as float32 tensors on the CPU; the
samplers and losses gather what they need onto the device of their inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

BetaKind = Literal["linear", "cosine", "scaled_linear", "sigmoid"]
Spacing = Literal["leading", "trailing", "linspace"]
BETA_KINDS: tuple[str, ...] = ("linear", "cosine", "scaled_linear", "sigmoid")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class ScheduleConfig:
    """What defines a schedule. ``beta_start``/``beta_end`` are ignored by "cosine"."""

    kind: BetaKind = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    cosine_s: float = 0.008

    @classmethod
    def ddpm(cls) -> "ScheduleConfig":
        """Ho et al. 2020: linear β from 1e-4 to 0.02 over 1000 steps."""
        return cls()

    @classmethod
    def cosine(cls) -> "ScheduleConfig":
        """Nichol & Dhariwal 2021, Eq. 17."""
        return cls(kind="cosine")

    @classmethod
    def stable_diffusion(cls) -> "ScheduleConfig":
        """Stable Diffusion: √β linear from √0.00085 to √0.012."""
        return cls(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)

    def with_(self, **changes) -> "ScheduleConfig":
        return replace(self, **changes)


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """β_t for t = 0 … T−1 in float64.

    linear:        β_t evenly spaced in [β_start, β_end]                 [Ho et al. 2020, §4]
    scaled_linear: √β_t evenly spaced in [√β_start, √β_end]              [Rombach et al. 2022]
    sigmoid:       β_t = β_start + (β_end − β_start)·σ(x_t), x_t ∈ [−6, 6] evenly  [Xu et al. 2022, GeoDiff]
    cosine:        ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2),
                   β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999)                      [Nichol & Dhariwal 2021, Eq. 17]
    """
    T = config.num_train_timesteps
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T}")
    f64 = torch.float64
    if config.kind == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=f64)
    if config.kind == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=f64) ** 2
    if config.kind == "sigmoid":
        x = torch.linspace(-6, 6, T, dtype=f64)
        return config.beta_start + (config.beta_end - config.beta_start) * torch.sigmoid(x)
    if config.kind == "cosine":
        s = config.cosine_s
        steps = torch.arange(T + 1, dtype=f64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule kind {config.kind!r}; known: {', '.join(BETA_KINDS)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_{T−1} = 0 (SNR 0 at the last step) and ᾱ_0 is unchanged.

        √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1})     [Lin et al. 2023, Algorithm 1]

    With it, the model sees pure noise at t = T−1, as it does at sampling time.
    ε-prediction is undefined there, so pair it with v-prediction.
    """
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """β_t and every quantity derived from it, as float32 tensors of length T.

    Symbols → attributes:
        β_t → betas          α_t = 1 − β_t → alphas       ᾱ_t = ∏_{s≤t} α_s → alpha_bar
        ᾱ_{t−1} → alpha_bar_prev (ᾱ_{−1} = 1)
        √ᾱ_t → sqrt_alpha_bar                  √(1 − ᾱ_t) → sqrt_one_minus_alpha_bar
        β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t → posterior_variance   [Ho et al. 2020, Eq. 7]
    """

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config = config or ScheduleConfig()
        betas = make_betas(config)
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        if not (betas > 0).all() or not (betas <= 1).all():
            raise ValueError(f"betas must lie in (0, 1]; check beta_start/beta_end in {config}")
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])

        f32 = torch.float32
        self.betas = betas.to(f32)
        self.alphas = alphas.to(f32)
        self.alpha_bar = alpha_bar.to(f32)
        self.alpha_bar_prev = alpha_bar_prev.to(f32)
        self.sqrt_alpha_bar = alpha_bar.sqrt().to(f32)
        self.sqrt_one_minus_alpha_bar = (1 - alpha_bar).sqrt().to(f32)
        self.posterior_variance = ((1 - alpha_bar_prev) / (1 - alpha_bar) * betas).to(f32)
        # Samplers and the posterior form 1 − ᾱ_t and 1 − ᾱ_t/ᾱ_s, which cancel catastrophically in
        # float32 near t = 0 (ᾱ ≈ 1); they work from this float64 copy.
        self.alpha_bar_f64 = alpha_bar

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config})"

    def variance(self, kind: Literal["fixed_small", "fixed_large"]) -> torch.Tensor:
        """Reverse-step variance σ_t²: β̃_t ("fixed_small") or β_t ("fixed_large").

        Ho et al. 2020, §3.2: both give similar samples; β_t is the upper bound
        on the true reverse variance (x_0 ~ N(0, I)), β̃_t the lower (x_0 fixed).
        """
        if kind == "fixed_small":
            return self.posterior_variance
        if kind == "fixed_large":
            return self.betas
        raise ValueError(f"unknown variance {kind!r}; known: fixed_small, fixed_large")

    def snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t)  [Kingma et al. 2021, Eq. 2]."""
        ab = self.alpha_bar if t is None else self.alpha_bar[t.cpu()]
        return ab / (1 - ab)

    def log_snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """λ(t) = log ᾱ_t − log(1 − ᾱ_t); −∞ at a zero-terminal-SNR last step."""
        ab = self.alpha_bar.double() if t is None else self.alpha_bar[t.cpu()].double()
        return (ab.log() - torch.log1p(-ab)).float()

    def timesteps(self, num_inference_steps: int, spacing: Spacing = "leading", steps_offset: int = 0) -> torch.Tensor:
        """The S timesteps a sampler visits, in decreasing order (int64, shape (S,)).

        With T train steps and S = ``num_inference_steps`` (as in diffusers, so runs match):
            leading:  t_i = i·⌊T/S⌋ + offset              for i = S−1 … 0   [Song et al. 2021, DDIM]
            trailing: t_i = round(T − i·T/S) − 1          for i = 0 … S−1   [Lin et al. 2023, Table 2]
            linspace: t_i = round(i·(T − 1)/(S − 1))      for i = S−1 … 0
        "trailing" starts at t = T−1, which zero-terminal-SNR models need.
        """
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}] (the schedule's T), got {num_inference_steps}")
        S = num_inference_steps
        if spacing == "leading":
            ts = torch.arange(S - 1, -1, -1, dtype=torch.float64) * (T // S) + steps_offset
        elif spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / S, dtype=torch.float64))[:S] - 1
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, S, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(SPACINGS)}")
        ts = ts.long()
        if ts.max() >= T or ts.min() < 0:
            raise ValueError(f"steps_offset={steps_offset} pushes timesteps outside [0, {T})")
        return ts


def gather(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """values[t] shaped to broadcast against x: (B,) → (B, 1, …, 1), on x's device, in x's dtype unless given.

    The one place where per-timestep coefficients meet a batch  [cf. improved-diffusion's
    ``_extract_into_tensor``]. Checks t ∈ [0, T) so an off-by-one fails loudly.
    """
    t = torch.as_tensor(t)
    if t.dtype.is_floating_point:
        raise TypeError(f"timesteps must be integers, got {t.dtype}")
    t_cpu = t.detach().cpu().reshape(-1)
    if t_cpu.numel() and (t_cpu.min() < 0 or t_cpu.max() >= len(values)):
        raise ValueError(f"timestep out of range [0, {len(values)}): got min {int(t_cpu.min())}, max {int(t_cpu.max())}")
    out = values[t_cpu].to(device=x.device, dtype=dtype or x.dtype)
    if out.numel() == 1:
        out = out.expand(x.shape[0])
    return out.reshape(-1, *([1] * (x.dim() - 1)))
