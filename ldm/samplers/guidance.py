"""Classifier-free guidance as a model wrapper  [Ho & Salimans 2022]."""

from __future__ import annotations

import torch

from .common import Model


def classifier_free_guidance(model: Model, scale: float, uncond: torch.Tensor) -> Model:
    """Wrap ``model`` so that it returns the guided prediction

        ε̃ = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅))        [Ho & Salimans 2022, Eq. 6]

    with w = ``scale`` and ∅ = ``uncond`` (the null label, or the empty-prompt context),
    batch 1 or B. The combination is affine, so it holds for ε, x₀ and v outputs alike.
    w = 1 returns the conditional model itself; the two passes run as one batch of 2B.
    """

    def guided(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition (cond=None given)")
        if scale == 1.0:
            return model(x_t, t, cond)
        null = uncond.to(cond.device).expand_as(cond) if uncond.shape[0] == 1 else uncond.to(cond.device)
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        out_cond, out_uncond = out.chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
