"""DPM-Solver++(2M), its SDE variant and DPM-Solver++(3M)  [Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"; Lu et al. 2022, "DPM-Solver: A Fast ODE Solver…", §3.3, Algorithm 3]."""

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
          final_alpha_bar: float | None, timesteps: torch.Tensor | None, sigmas: SigmaSchedule | None, begin: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the S timesteps, ᾱ at each of them and after the last: (S + 1,) float64). ᾱ = 1/(1 + σ²) on a σ schedule.
    ``begin`` drops the first steps of the plan (image-to-image; diffusers' ``set_begin_index``)."""
    if sigmas is None:
        if timesteps is None:
            timesteps = dpm_solver_timesteps(schedule, num_inference_steps, spacing, steps_offset)
        ab, ab_next = alpha_bars(schedule, timesteps[begin:], final_alpha_bar)
        return timesteps[begin:], torch.cat([ab, ab_next[-1:]])
    if timesteps is not None:
        raise ValueError("pass timesteps or a sigma schedule, not both (a schedule picks its own timesteps)")
    timesteps, sigma = dpm_solver_sigma_steps(schedule, num_inference_steps, sigmas)
    if not 0 <= begin < len(timesteps):
        raise ValueError(f"begin must be in [0, {len(timesteps)}), got {begin}")
    last = torch.tensor([1.0 if final_alpha_bar is None else final_alpha_bar], dtype=torch.float64)
    return timesteps[begin:], torch.cat([1 / (1 + sigma[begin:] ** 2), last])


def _step(x: torch.Tensor, D: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor, alpha_t: torch.Tensor,
          h: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """``dpmpp_2m``'s step 3 (the ODE): x_t from x_s and D, s → t over h in λ; or with ``noise`` z its SDE form
      3'. x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) e^{−h_i} · x_{t_{i−1}} + α_{t_i} (1 − e^{−2h_i}) · D_i + σ_{t_i} √(1 − e^{−2h_i}) · z
    the reverse SDE's exact solution with x̂_0 held at D_i: twice the ODE's pull towards D, plus fresh noise
    (drawn on every step, the last too, as diffusers' ``algorithm_type="sde-dpmsolver++"``)."""
    if noise is None:
        return (sigma_t / sigma_s).to(x.dtype) * x - (alpha_t * torch.expm1(-h)).to(x.dtype) * D
    return ((sigma_t / sigma_s * torch.exp(-h)).to(x.dtype) * x - (alpha_t * torch.expm1(-2 * h)).to(x.dtype) * D
            + (sigma_t * (-torch.expm1(-2 * h)).sqrt()).to(x.dtype) * noise)


def _multistep_D(x0s: list[torch.Tensor], lam: torch.Tensor, i: int) -> torch.Tensor:
    """D_i of ``dpmpp_2m``'s step 2 from the newest estimates ``x0s`` (as many as the step's order)."""
    if len(x0s) == 1:
        return x0s[0]
    if len(x0s) == 2:
        half_over_r = 0.5 * (lam[i + 1] - lam[i]) / (lam[i] - lam[i - 1])  # 1/(2r)
        return (1 + half_over_r).to(x0s[0].dtype) * x0s[0] - half_over_r.to(x0s[0].dtype) * x0s[1]
    return _third_order_D(x0s, lam, i)


def _third_order_D(x0s: list[torch.Tensor], lam: torch.Tensor, i: int) -> torch.Tensor:
    """``dpmpp_3m``'s D_i: the x̂_0 that, held over the step, gives the third-order multistep update.

    ``x0s`` = [m_0, m_1, m_2] = x̂_0 now, one step back, two steps back, at λ = ``lam[i]``, ``lam[i − 1]``,
    ``lam[i − 2]``; this step goes to ``lam[i + 1]``. With φ = e^{−h_i} − 1, r0 = h_{i−1}/h_i, r1 = h_{i−2}/h_i:
      D1_0 = (m_0 − m_1)/r0,  D1_1 = (m_1 − m_2)/r1,
      D1 = D1_0 + r0/(r0 + r1) · (D1_0 − D1_1),  D2 = (D1_0 − D1_1)/(r0 + r1)
      x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i} φ m_0 + α_{t_i} (φ/h_i + 1) D1 − α_{t_i} ((φ + h_i)/h_i² − ½) D2
    i.e. ``dpmpp_2m``'s step 3 with D_i = m_0 − (φ/h_i + 1)/φ · D1 + ((φ + h_i)/h_i² − ½)/φ · D2. D1 and D2 are
    h·x̂_0' and h²·x̂_0''/2 of the parabola through the three estimates (in λ), and the weights are the integrals of
    e^λ against 1, (λ − λ_s) and (λ − λ_s)² over the step: the ODE's solution with x̂_0 expanded to second order
    in λ  [Lu et al. 2022, "DPM-Solver", §3.3 and Algorithm 3 (there for ε); "DPM-Solver++", §4 and App. B]."""
    m0, m1, m2 = x0s
    h, h0, h1 = lam[i + 1] - lam[i], lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m0 - m1) / r0.to(m0.dtype), (m1 - m2) / r1.to(m0.dtype)
    D1 = d1_0 + (r0 / (r0 + r1)).to(m0.dtype) * (d1_0 - d1_1)
    D2 = (d1_0 - d1_1) / (r0 + r1).to(m0.dtype)
    phi1 = torch.expm1(-h)  # e^{−h} − 1
    c1 = -(phi1 / h + 1) / phi1  # the D1 term's weight over the D term's
    c2 = ((phi1 + h) / h**2 - 0.5) / phi1  # the D2 term's
    return m0 + c1.to(m0.dtype) * D1 + c2.to(m0.dtype) * D2


@torch.no_grad()
def dpmpp_2m(
    model: Model, schedule: NoiseSchedule, x_T: torch.Tensor, *, num_inference_steps: int = 50,
    spacing: Spacing = "leading", steps_offset: int = 0, final_alpha_bar: float | None = None,
    prediction: Prediction = "eps", cond: torch.Tensor | None = None, clip_x0: bool = False,
    generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
    sigmas: SigmaSchedule | None = None, sde: bool = False, order: int = 2, begin: int = 0,
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

    With ``sde`` step 3 is the reverse SDE's (``_step``), with fresh noise drawn on every step.

    ``order=3`` is DPM-Solver++(3M) (diffusers' ``solver_order=3``, ODE only): step 3 with D_i from the last three
    estimates (``_third_order_D``, with its formulas). Warm-up and finish as diffusers': order 1 on the first step,
    2 on the second, 3 after; order 1 on the last (as for 2M) and 2 on the one before it when S < 15.

    Visits ``dpm_solver_timesteps(schedule, S, spacing, steps_offset)`` unless ``timesteps`` is given
    (img2img starts part-way) or ``sigmas`` names a σ schedule (``dpm_solver_sigma_steps``: the solver steps
    between its σ's, ᾱ = 1/(1 + σ²)); ``begin`` starts the plan part-way (img2img on a σ schedule: the history
    and the warm-up start afresh there, as diffusers'). Without ``sde``, deterministic: ``generator`` is then unused.
    Yields one ``StepRecord`` per step. Shapes: x_T (B, C, H, W).
    """
    timesteps, ab_all = _plan(schedule, num_inference_steps, spacing, steps_offset, final_alpha_bar, timesteps, sigmas,
                              begin)
    alpha, sigma = ab_all.sqrt(), (1 - ab_all).sqrt()  # float64, one more than the steps: where the last one lands
    lam = alpha.log() - sigma.log()  # +∞ at ᾱ = 1, where e^{−h} = 0 and σ_{t_i}/σ = 0: that step returns D
    last = len(timesteps) - 1
    if order not in (2, 3) or (order == 3 and sde):
        raise ValueError(f"order must be 2 or 3 (3 without sde), got order={order}, sde={sde}")
    few = num_inference_steps < 15
    lower_order_final = sigma[-1] == 0 or few
    x, history = x_T, []  # the x̂_0's of the earlier steps, newest last
    for i, t in enumerate(timesteps.tolist()):
        x0_pred, _ = predict(model, prediction, x, t, cond, ab_all[i].to(x.dtype), clip_x0)
        h = lam[i + 1] - lam[i]
        step_order = min(order, len(history) + 1, 2 if i == last - 1 and few else order)
        step_order = 1 if i == last and lower_order_final else step_order
        D = _multistep_D([x0_pred, *reversed(history)][:step_order], lam, i)
        noise = randn(x.shape, generator, x.device, x.dtype) if sde else None
        x_prev = _step(x, D, sigma[i], sigma[i + 1], alpha[i + 1], h, noise)
        yield StepRecord(i, t, x, x0_pred, x_prev)
        x, history = x_prev, (history + [x0_pred])[-(order - 1):]


# The same solver with the noise switched on: one definition, two registry entries.
dpmpp_2m_sde = partial(dpmpp_2m, sde=True)
# And with one more estimate remembered: the third-order multistep solver.
dpmpp_3m = partial(dpmpp_2m, order=3)
