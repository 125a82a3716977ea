"""DPM++ SDE: the stochastic second-order DPM-Solver++ of k-diffusion's ``sample_dpmpp_sde`` (diffusers'
``DPMSolverSDEScheduler``)  [Lu et al. 2022, "DPM-Solver++", Algorithm 1 (singlestep, r = ½) with ancestral noise;
Crowson, k-diffusion], with its Brownian noise drawn from the generator instead of a Brownian tree."""

from __future__ import annotations

import torch

from ..diffusion import Prediction
from ..schedule import NoiseSchedule, Spacing
from .common import Model, SamplerLoop, StepRecord, randn
from .euler import as_timestep, denoise, sigma_steps
from .sigmas import SigmaSchedule, sigma_to_t


def _ancestral_step(x: torch.Tensor, D: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor,
                    z: torch.Tensor) -> torch.Tensor:
    """x_σ → x_σ_to in σ-space: DPM-Solver++(1) (DDIM) down to σ_down with x̂_0 held at D, then fresh noise up to σ_to:
        σ_up = min(σ_to, √(σ_to² (σ² − σ_to²)/σ²)),  σ_down = √(σ_to² − σ_up²)   (k-diffusion's ``get_ancestral_step``)
        x_σ_to = (σ_down/σ) · x_σ + (1 − σ_down/σ) · D + σ_up · z."""
    sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2).sqrt())
    ratio = (sigma_to**2 - sigma_up**2).sqrt() / sigma
    return ratio.to(x.dtype) * x + (1 - ratio).to(x.dtype) * D + sigma_up.to(x.dtype) * z


def brownian_noise(shape: tuple[int, ...], generator, device, dtype, sigma: torch.Tensor, sigma_mid: torch.Tensor,
                   sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two normalised Brownian increments one step uses: n₁ = (W(σ_mid) − W(σ))/√(σ − σ_mid) and
    n₂ = (W(σ_next) − W(σ))/√(σ − σ_next), with their true correlation √a, a = (σ − σ_mid)/(σ − σ_next) (the
    intervals overlap): n₁ = z₁, n₂ = √a z₁ + √(1 − a) z₂ from two generator draws z₁, z₂ ~ N(0, I).

    k-diffusion and diffusers take W (Brownian motion in σ) from a torchsde ``BrownianTree`` seeded once; this has the
    same law step by step (and increments of different steps are independent in both), so the sampled distribution
    is the same, but not the same path: a seed gives other images than diffusers', and a run with other steps draws
    a new path where the tree would refine the old one."""
    z1 = randn(shape, generator, device, dtype)
    z2 = randn(shape, generator, device, dtype)
    a = (sigma - sigma_mid) / (sigma - sigma_next)
    return z1, a.sqrt().to(dtype) * z1 + (1 - a).sqrt().to(dtype) * z2


@torch.no_grad()
def dpmpp_sde(
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
    """DPM++ SDE: per step a stochastic DPM-Solver++(1) half-step in λ = −log σ, a second model call there, and the
    full step from the first point with the midpoint's x̂_0 (k-diffusion's ``sample_dpmpp_sde``, η = 1, r = ½).

    Symbols as in ``euler`` (x_σ = x_t · √(1 + σ²) = x_0 + σ ε); step σ → σ', σ_m = √(σ σ') (the midpoint in λ).
      1. D₁ = x̂_0(x_σ, σ)
      2. x_m = ancestral(x_σ, D₁, σ → σ_m, n₁)             (``_ancestral_step``: DDIM down, then noise up)
      3. D₂ = x̂_0(x_m, σ_m)                                (the model at t(σ_m), fractional)
      4. x_σ' = ancestral(x_σ, D₂, σ → σ', n₂)
    The midpoint estimate makes the step second order  [Lu et al. 2022, "DPM-Solver++", Algorithm 1 with r = ½:
    (1 − 1/(2r)) D₁ + 1/(2r) D₂ = D₂]; the ancestral split adds exactly the noise the DDPM posterior would, so the
    chain samples the reverse SDE. The last step, to σ' = 0, is an Euler step (one call): x̂_0. S steps cost 2S − 1
    model calls. n₁, n₂: Brownian increments over [σ_m, σ] and [σ', σ], drawn from ``generator`` (``brownian_noise``;
    not torchsde's Brownian tree, so seeds do not reproduce diffusers' images — the distribution is the same).

    Takes ``sigma_steps``' plan (the Euler family's σ range; ``sigmas`` names a σ schedule, ``begin`` starts it
    part-way). Yields one ``StepRecord`` per step (x̂_0 the first call's). Shapes: x_T (B, C, H, W), model space.
    """
    timesteps, sigma_plan = sigma_steps(schedule, num_inference_steps, spacing, steps_offset, timesteps, sigmas, begin)
    x = x_T
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = sigma_plan[i], sigma_plan[i + 1]
        x0_pred, x_sigma, d = denoise(model, prediction, x, t, sigma, cond, clip_x0)
        if sigma_next == 0:
            x_sigma = x_sigma + (sigma_next - sigma).to(x.dtype) * d
        else:
            sigma_mid = (sigma * sigma_next).sqrt()
            n1, n2 = brownian_noise(x.shape, generator, x.device, x.dtype, sigma, sigma_mid, sigma_next)
            x_mid = _ancestral_step(x_sigma, x0_pred, sigma, sigma_mid, n1)
            t_mid = float(sigma_to_t(schedule, sigma_mid.reshape(1))[0])
            x0_mid, _, _ = denoise(model, prediction, x_mid / (1 + sigma_mid**2).sqrt().to(x.dtype), t_mid, sigma_mid,
                                   cond, clip_x0)
            x_sigma = _ancestral_step(x_sigma, x0_mid, sigma, sigma_next, n2)
        x_prev = x_sigma / (1 + sigma_next**2).sqrt().to(x.dtype)
        yield StepRecord(i, as_timestep(t), x, x0_pred, x_prev)
        x = x_prev
