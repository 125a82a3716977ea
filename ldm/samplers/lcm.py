"""Multistep latent consistency sampling  [Luo et al. 2023, "Latent Consistency Models", §4, Algorithm 2].

A latent consistency model (LCM) is a UNet distilled so that one evaluation maps a noisy latent z_t straight to the
start of its probability-flow ODE trajectory, z_0. Sampling in a few steps alternates that jump with re-noising:
jump to ẑ_0 from the current timestep, noise ẑ_0 forward to the next (smaller) timestep with fresh noise, jump again
from there. The timesteps come from the coarse schedule the model was distilled on (every k-th training step), not
from all T training steps as the other samplers' do.
"""

from __future__ import annotations

import torch

from ..diffusion import Prediction
from ..schedule import NoiseSchedule
from .common import Model, SamplerLoop, StepRecord, alpha_bars, predict, randn

SIGMA_DATA = 0.5  # σ_data of the consistency-model boundary condition  [Song et al. 2023, §3]
TIMESTEP_SCALING = 10.0  # t is scaled by this in c_skip, c_out (diffusers' LCMScheduler.timestep_scaling)
ORIGINAL_INFERENCE_STEPS = 50  # N, the length of the distillation schedule (LCMScheduler.original_inference_steps)


def lcm_timesteps(num_train_timesteps: int, num_inference_steps: int,
                  original_inference_steps: int = ORIGINAL_INFERENCE_STEPS, strength: float = 1.0) -> torch.Tensor:
    """The S timesteps LCM sampling visits, decreasing (int64, shape (S,)): S evenly spaced entries of the
    distillation schedule  [Luo et al. 2023, §4.3, "skipping-step" k] (diffusers' ``LCMScheduler.set_timesteps``).

        k = ⌊T / N⌋                                              the skipping step
        τ = (k·⌊N·strength⌋ − 1, …, 2k − 1, k − 1)               the distillation schedule (999, 979, …, 19)
        t_i = τ[⌊i · |τ| / S⌋],  i = 0 … S − 1

    (the index as ``numpy.linspace(0, |τ|, S, endpoint=False)`` floors it, in float64). ``strength`` < 1 keeps only
    the lowest ⌊N·strength⌋ distillation steps, so an image-to-image run still takes S steps, all below
    k·⌊N·strength⌋ (diffusers' LCM img2img pipeline; ``StableDiffusion.img2img`` instead keeps the last
    ⌊strength·S⌋ steps of the full plan, as for every sampler). Needs S ≤ ⌊N·strength⌋ and N ≤ T.
    """
    T, S, N = num_train_timesteps, num_inference_steps, original_inference_steps
    if not 1 <= N <= T:
        raise ValueError(f"original_inference_steps must be in [1, {T}] (the schedule's T), got {N}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    k = T // N
    tau = (torch.arange(1, int(N * strength) + 1, dtype=torch.int64) * k - 1).flip(0)
    if not 1 <= S <= len(tau):
        raise ValueError(f"num_inference_steps must be in [1, {len(tau)}]: LCM takes its steps from the "
                         f"{len(tau)}-step distillation schedule (original_inference_steps={N} × strength={strength}), "
                         f"got {S}")
    index = (torch.arange(S, dtype=torch.float64) * (len(tau) / S)).floor().long()
    return tau[index]


def boundary_scalings(t: int, timestep_scaling: float = TIMESTEP_SCALING) -> tuple[float, float]:
    """(c_skip(t), c_out(t)), the consistency function's boundary-condition scalings  [Luo et al. 2023, §4.1, after
    Song et al. 2023, §3 and App. C], with τ = timestep_scaling · t, as diffusers' ``LCMScheduler`` computes them:

        c_skip = σ_data² / (τ² + σ_data²),    c_out = τ / √(τ² + σ_data²)

    so f(z, 0) = z exactly (c_skip = 1, c_out = 0), the boundary condition, and from t = 1 on (τ = 10) f is all but
    the model's x̂_0 (c_skip < 2.5·10⁻³, c_out > 0.998)."""
    tau = timestep_scaling * t
    return SIGMA_DATA**2 / (tau**2 + SIGMA_DATA**2), tau / (tau**2 + SIGMA_DATA**2) ** 0.5


@torch.no_grad()
def lcm(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    num_inference_steps: int = 4,
    original_inference_steps: int | None = None,
    strength: float = 1.0,
    timestep_scaling: float = TIMESTEP_SCALING,
    prediction: Prediction = "eps",
    cond: torch.Tensor | None = None,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> SamplerLoop:
    """Multistep latent consistency sampling  [Luo et al. 2023, Algorithm 2; Song et al. 2023, Algorithm 1].

    Symbols: t the current timestep, s the next one of the plan (``lcm_timesteps``), ᾱ_t, ᾱ_s from the schedule,
    x̂_0 the UNet's estimate in its parametrisation (ε, x₀ or v), f the consistency function.
      1. x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t  (ε-prediction; optionally clip x̂_0)
      2. f(x_t, t) = c_skip(t) · x_t + c_out(t) · x̂_0          (``boundary_scalings``; LCM's parametrisation, §4.1)
      3. x_s = √ᾱ_s · f(x_t, t) + √(1 − ᾱ_s) · z,  z ~ N(0, I)  (fresh noise; after the last step x_s = f)
    An LCM-distilled UNet reads the guidance scale ω as an input (the w-embedding; ``ldm.blocks.
    guidance_scale_embedding``), so it is run once per step, unguided; an LCM-LoRA on an ordinary UNet is guided
    as usual. The record's ``x0_pred`` is f(x_t, t). ``timesteps`` overrides the plan (img2img starts part-way);
    ``original_inference_steps`` (N, default 50) and ``strength`` shape the plan and so cannot come with it.
    Shapes: x_T (B, C, H, W).
    """
    if timesteps is None:
        timesteps = lcm_timesteps(schedule.num_train_timesteps, num_inference_steps,
                                  original_inference_steps or ORIGINAL_INFERENCE_STEPS, strength)
    elif original_inference_steps is not None or strength != 1.0:
        raise ValueError("original_inference_steps and strength choose LCM's timesteps, and timesteps were given: "
                         "pass timesteps=lcm_timesteps(T, S, original_inference_steps, strength) instead")
    ab, ab_next = alpha_bars(schedule, timesteps)
    x = x_T
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps.tolist()):
        a_t, a_s = ab[i].to(x.device, torch.float64), ab_next[i].to(x.device, torch.float64)
        x0_pred, _ = predict(model, prediction, x, t, cond, a_t.to(x.dtype), clip_x0)
        c_skip, c_out = boundary_scalings(t, timestep_scaling)
        denoised = c_skip * x + c_out * x0_pred
        if i < last:
            noise = randn(x.shape, generator, x.device, x.dtype)
            x_prev = a_s.sqrt().to(x.dtype) * denoised + (1 - a_s).sqrt().to(x.dtype) * noise
        else:
            x_prev = denoised
        yield StepRecord(i, t, x, denoised, x_prev)
        x = x_prev
