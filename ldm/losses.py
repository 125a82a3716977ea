"""The denoising training objective."""

from __future__ import annotations

import torch

from .diffusion import Model, Prediction, q_sample, training_target
from .schedule import NoiseSchedule, gather


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-γ loss weight, expressed for each parametrisation  [Hang et al. 2023, Eq. 11 and §3.4].

    The weight on the x_0 error is min(SNR, γ). Since ‖ε − ε̂‖² = SNR·‖x_0 − x̂_0‖² and
    ‖v − v̂‖² = (SNR + 1)·‖x_0 − x̂_0‖², the same weighting in the other targets is
        ε: min(SNR, γ) / SNR      v: min(SNR, γ) / (SNR + 1)      x_0: min(SNR, γ).
    """
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        # SNR = 0 (zero-terminal-SNR last step): the ε target carries no x_0 information; weight 1.
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    model: Model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    prediction: Prediction = "eps",
    cond: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample L_simple: the mean squared error of the model's prediction.

        L_simple = E_{t, x_0, ε} ‖target − f_θ(x_t, t)‖²,  x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε
                                                            [Ho et al. 2020, Eq. 14]
    with target ε, x_0 or v (``prediction``), t ~ U{0, …, T−1}, optionally weighted by
    Min-SNR-γ. ``t`` and ``noise`` may be given (e.g. for loss-by-timestep plots); else
    they are drawn from ``generator``. Returns the loss per sample, shape (B,).
    """
    B = x0.shape[0]
    rng_device = generator.device if generator is not None else torch.device("cpu")
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=generator, device=rng_device)
    t = t.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=rng_device, dtype=x0.dtype).to(x0.device)

    x_t = q_sample(schedule, x0, t, noise)
    target = training_target(prediction, x0, noise, gather(schedule.alpha_bar, t, x0))
    model_output = model(x_t, t, cond)
    if model_output.shape != target.shape:
        raise ValueError(f"model output shape {tuple(model_output.shape)} != target shape {tuple(target.shape)}")
    loss = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(schedule.snr(t), min_snr_gamma, prediction).to(loss.device)
    return loss
