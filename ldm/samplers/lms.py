"""Linear multistep (Adams–Bashforth) sampling in σ-space  [k-diffusion's ``sample_lms``]."""

from __future__ import annotations

import numpy as np
import torch

from ..diffusion import Prediction
from ..schedule import NoiseSchedule, Spacing
from .common import Model, SamplerLoop, StepRecord
from .euler import as_timestep, denoise, sigma_steps
from .sigmas import SigmaSchedule


def lms_coefficients(sigmas: torch.Tensor, i: int, order: int) -> list[float]:
    """c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ, j = 0 … order − 1: the weight of the slope d_{i−j} in the step from σ_i.

    ℓ_j(σ) = ∏_{k≠j} (σ − σ_{i−k}) / (σ_{i−j} − σ_{i−k}) is the Lagrange basis polynomial through the last
    ``order`` noise levels, so Σ_j c_j d_{i−j} integrates the polynomial through the last slopes exactly: the
    Adams–Bashforth formula for uneven steps  [Hairer, Nørsett & Wanner, "Solving ODEs I", §III.1].
    """
    s = sigmas.tolist()
    coefficients = []
    for j in range(order):
        basis = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
        integral = basis.integ()
        coefficients.append(float(integral(s[i + 1]) - integral(s[i])))
    return coefficients


@torch.no_grad()
def lms(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    order: int = 4,
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
    """The probability-flow ODE dx_σ/dσ = d by an ``order``-step linear multistep method, as diffusers'
    ``LMSDiscreteScheduler`` (order 4).

    Symbols as in ``euler``: d_i = (x_σ − x̂_0)/σ_i the slope at step i (one model call per step).
        x_σ_{i+1} = x_σ_i + Σ_{j<q} c_j · d_{i−j},   q = min(i + 1, order),   c_j from ``lms_coefficients``
    The first steps have fewer slopes to reuse, so they start at first order (an Euler step) and climb; the
    extrapolation that makes high orders cheap also makes them unstable for large steps, hence order ≤ 4.

    Takes ``sigma_steps``' plan: ``timesteps`` overrides the visited steps, ``sigmas`` names a σ schedule, ``begin``
    starts it part-way (image-to-image).
    Deterministic: ``generator`` is accepted for a common signature and unused. Yields one ``StepRecord`` per
    step. Shapes: x_T (B, C, H, W), in model space.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    timesteps, sigmas = sigma_steps(schedule, num_inference_steps, spacing, steps_offset, timesteps, sigmas, begin)
    x, slopes = x_T, []  # newest first
    for i, t in enumerate(timesteps.tolist()):
        x0_pred, x_sigma, d = denoise(model, prediction, x, t, sigmas[i], cond, clip_x0)
        slopes = [d, *slopes][:order]
        for c, slope in zip(lms_coefficients(sigmas, i, len(slopes)), slopes):
            x_sigma = x_sigma + c * slope
        x_prev = x_sigma / (1 + sigmas[i + 1] ** 2).sqrt().to(x.dtype)
        yield StepRecord(i, as_timestep(t), x, x0_pred, x_prev)
        x = x_prev
