"""Classifier-free guidance as a model wrapper  [Ho & Salimans 2022]."""

from __future__ import annotations

import torch

from ..conditioning import join
from .common import Model


def classifier_free_guidance(model: Model, scale: float, uncond, rescale: float = 0.0) -> Model:
    """Wrap ``model`` so that it returns the guided prediction

        ε̃ = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅))        [Ho & Salimans 2022, Eq. 6]

    with w = ``scale`` and ∅ = ``uncond`` (the null label, or the empty-prompt ``Conditioning``),
    batch 1 or B. The combination is affine, so it holds for ε, x₀ and v outputs alike.
    w = 1 returns the conditional model itself; the two passes run as one batch of 2B
    (``ldm.conditioning.join`` stacks the two conditions).

    ``rescale`` = φ > 0 pulls the guided output's per-sample standard deviation back towards the
    conditional one's, which large w inflates (over-exposed images, worst with zero-terminal-SNR v-models):

        ε̂ = φ · ε̃ · std(ε(x_t, c)) / std(ε̃) + (1 − φ) · ε̃        [Lin et al. 2024, Eq. 15–16]
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")

    def guided(x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition (cond=None given)")
        if scale == 1.0:
            return model(x_t, t, cond)
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), join(cond, uncond))
        out_cond, out_uncond = out.chunk(2)
        guided_out = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:
            dims = list(range(1, out.dim()))
            ratio = out_cond.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True)
            guided_out = rescale * guided_out * ratio + (1 - rescale) * guided_out
        return guided_out

    return guided
