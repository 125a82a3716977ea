"""DPM-Solver++(2M) and its SDE variant  [Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"]."""

from __future__ import annotations

from functools import partial

import torch

from ..diffusion import Prediction
from ..schedule import NoiseSchedule, Spacing
from .common import Model, SamplerLoop, StepRecord, alpha_bars, predict, randn
from .sigmas import SigmaSchedule, sigma_schedule, sigma_to_t


def dpm_solver_timesteps(schedule: NoiseSchedule, num_inference_steps: int, spacing: Spacing = "leading",
                         steps_offset: int = 0) -> torch.Tensor:
    """The S timesteps DPM-Solver visits (int64, decreasing), as diffusers' ``DPMSolverMultistepScheduler`` picks them.

    "leading" and "linspace" cut [0, T) into S + 1 points and drop the last (t ≈ 0): the solver's grid
    ends at the data, which the last step reaches by jumping to σ = 0. So "leading" steps by ⌊T/(S+1)⌋,
    not ⌊T/S⌋ as DDIM does. "trailing" is the same as everywhere else.
    """
    if spacing == "trailing":
        return schedule.timesteps(num_inference_steps, spacing, steps_offset)
    return schedule.timesteps(num_inference_steps + 1, spacing, steps_offset)[:-1]


def dpm_solver_sigma_steps(schedule: NoiseSchedule, num_inference_steps: int, sigmas: SigmaSchedule
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A named σ schedule as diffusers' ``DPMSolverMultistepScheduler`` builds it: (timesteps int64, σ float64), S each.

    The S σ's span the whole training range [σ(0), σ(T − 1)] whatever the spacing (the Euler family spans its
    spacing's first and last timestep instead), and the solver steps between these σ's exactly; the model is asked
    at t(σ) (``sigma_to_t``) made an integer: rounded for "karras", truncated for "exponential" and "beta" (diffusers
    casts those to int64 unrounded).
    """
    ab = schedule.alpha_bar_f64
    train = ((1 - ab) / ab).sqrt()
    sigma = sigma_schedule(sigmas, train[-1], train[0], num_inference_steps)
    t = sigma_to_t(schedule, sigma)
    return (t.round() if sigmas == "karras" else t.floor()).long(), sigma


def _plan(schedule: NoiseSchedule, num_inference_steps: int, spacing: Spacing, steps_offset: int,
          final_alpha_bar: float | None, timesteps: torch.Tensor | None, sigmas: SigmaSchedule | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the S timesteps, ᾱ at each of them and after the last: (S + 1,) float64). ᾱ = 1/(1 + σ²) on a σ schedule."""
    if sigmas is None:
        if timesteps is None:
            timesteps = dpm_solver_timesteps(schedule, num_inference_steps, spacing, steps_offset)
        ab, ab_next = alpha_bars(schedule, timesteps, final_alpha_bar)
        return timesteps, torch.cat([ab, ab_next[-1:]])
    if timesteps is not None:
        raise ValueError("pass timesteps or a sigma schedule, not both (a schedule picks its own timesteps)")
    timesteps, sigma = dpm_solver_sigma_steps(schedule, num_inference_steps, sigmas)
    last = torch.tensor([1.0 if final_alpha_bar is None else final_alpha_bar], dtype=torch.float64)
    return timesteps, torch.cat([1 / (1 + sigma**2), last])


def _step(x: torch.Tensor, D: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor, alpha_t: torch.Tensor,
          h: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """``dpmpp_2m``'s step 3 (the ODE), or with ``noise`` step 3' (the SDE): x_t from x_s and D, s → t over h in λ."""
    if noise is None:
        return (sigma_t / sigma_s).to(x.dtype) * x - (alpha_t * torch.expm1(-h)).to(x.dtype) * D
    return ((sigma_t / sigma_s * torch.exp(-h)).to(x.dtype) * x - (alpha_t * torch.expm1(-2 * h)).to(x.dtype) * D
            + (sigma_t * (-torch.expm1(-2 * h)).sqrt()).to(x.dtype) * noise)


@torch.no_grad()
def dpmpp_2m(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    final_alpha_bar: float | None = None,
    prediction: Prediction = "eps",
    cond: torch.Tensor | None = None,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    sigmas: SigmaSchedule | None = None,
    sde: bool = False,
) -> SamplerLoop:
    """Multistep second-order solver of the probability-flow ODE in data prediction  [Lu et al. 2022, Algorithm 2];
    with ``sde``, of the reverse SDE (diffusers' ``algorithm_type="sde-dpmsolver++"``).

    Symbols: α = √ᾱ, σ = √(1 − ᾱ) (VP, so x_t = α x_0 + σ ε), λ = log(α/σ) (half the log-SNR),
    step i goes t_{i−1} → t_i, h_i = λ_{t_i} − λ_{t_{i−1}}, r_i = h_{i−1}/h_i, x̂_0 the model's data estimate.
      1. x̂_0(t_{i−1}) = model(x_{t_{i−1}}, t_{i−1})                        (as x̂_0, whatever the parametrisation)
      2. D_i = (1 + 1/(2r_i)) · x̂_0(t_{i−1}) − 1/(2r_i) · x̂_0(t_{i−2})      (D_i = x̂_0(t_{i−1}) on first-order steps)
      3. x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) · x_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) · D_i
    Step 3 is the ODE's exact solution x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x̂_0 dλ with x̂_0 held
    at D_i: the last estimate (first order: DPM-Solver++(1), which is DDIM with η = 0), or the line
    through the last two estimates read at the step's midpoint in λ (second order, "midpoint").
    The first step has no history, so it is first order; so is the last when it reaches σ = 0
    (h = ∞, r = 0) or when S < 15 (diffusers' ``lower_order_final``, counted on the full
    ``num_inference_steps`` also in img2img). ``final_alpha_bar``: ᾱ after the last step (1, i.e.
    σ = 0, by default; ᾱ_0 is diffusers' ``final_sigmas_type="sigma_min"``).

    SDE: 3'. x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) e^{−h_i} · x_{t_{i−1}} + α_{t_i} (1 − e^{−2h_i}) · D_i
                       + σ_{t_i} √(1 − e^{−2h_i}) · z_i,  z_i ~ N(0, I) drawn on every step (the last too, as diffusers)
    the reverse SDE's exact solution with x̂_0 held at D_i: twice the ODE's pull towards D, plus fresh noise.

    Visits ``dpm_solver_timesteps(schedule, S, spacing, steps_offset)`` unless ``timesteps`` is given
    (img2img starts part-way) or ``sigmas`` names a σ schedule (``dpm_solver_sigma_steps``: the solver steps
    between its σ's, ᾱ = 1/(1 + σ²)). Without ``sde``, deterministic: ``generator`` is then unused.
    Yields one ``StepRecord`` per step. Shapes: x_T (B, C, H, W).
    """
    timesteps, ab_all = _plan(schedule, num_inference_steps, spacing, steps_offset, final_alpha_bar, timesteps, sigmas)
    alpha, sigma = ab_all.sqrt(), (1 - ab_all).sqrt()  # float64, one more than the steps: where the last one lands
    lam = alpha.log() - sigma.log()  # +∞ at ᾱ = 1, where e^{−h} = 0 and σ_{t_i}/σ = 0: that step returns D
    last = len(timesteps) - 1
    lower_order_final = sigma[-1] == 0 or num_inference_steps < 15
    x, x0_before = x_T, None
    for i, t in enumerate(timesteps.tolist()):
        x0_pred, _ = predict(model, prediction, x, t, cond, ab_all[i].to(x.dtype), clip_x0)
        h = lam[i + 1] - lam[i]
        if x0_before is None or (i == last and lower_order_final):
            D = x0_pred
        else:
            half_over_r = 0.5 * h / (lam[i] - lam[i - 1])  # 1/(2r)
            D = (1 + half_over_r).to(x.dtype) * x0_pred - half_over_r.to(x.dtype) * x0_before
        noise = randn(x.shape, generator, x.device, x.dtype) if sde else None
        x_prev = _step(x, D, sigma[i], sigma[i + 1], alpha[i + 1], h, noise)
        yield StepRecord(i, t, x, x0_pred, x_prev)
        x, x0_before = x_prev, x0_pred


# The same solver with the noise switched on: one definition, two registry entries.
dpmpp_2m_sde = partial(dpmpp_2m, sde=True)
