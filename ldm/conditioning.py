"""What a denoiser is conditioned on, as one record that classifier-free guidance can double.

A UNet may see class labels, a text context, SDXL's pooled text and size ids, extra input
channels (the inpainting model's mask and masked-image latents), and an LCM-distilled UNet's
guidance-scale embedding. Samplers pass the record through
untouched; ``join`` is the one place that knows how to stack a conditional and an unconditional
batch into one, and the model wrapper (``ldm.sampling.Pipeline.denoiser``) the one place that
unpacks it into the UNet's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Conditioning:
    """One row per sample; every field is optional.

    labels (B,) int64 class ids · context (B, L, D) text hidden states · pooled (B, P) pooled text ·
    size_ids (B, n) SDXL's original size, crop corner and target size · concat (B, C, h, w) channels
    appended to x_t before the UNet (inpainting) · timestep_cond (B, D) the w-embedding of the guidance scale an
    LCM-distilled UNet reads beside the timestep (``ldm.blocks.guidance_scale_embedding``).
    """

    labels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    size_ids: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None

    def __post_init__(self):
        sizes = {f.name: t.shape[0] for f in fields(self) if (t := getattr(self, f.name)) is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning fields disagree on the batch size: {sizes}")

    def __len__(self) -> int:
        return next((t.shape[0] for f in fields(self) if (t := getattr(self, f.name)) is not None), 0)

    @property
    def token(self) -> torch.Tensor | None:
        """The UNet's ``cond`` argument: the text context, else the class labels."""
        return self.context if self.context is not None else self.labels


def join(cond, uncond):
    """Stack a conditional batch and its unconditional counterpart into one batch of 2B, as classifier-free
    guidance runs them: [cond; uncond] along dim 0, for tensors or ``Conditioning`` records field by field.

    An unconditional part of batch 1 (the null label) is broadcast to B first. Fields must be present in both or
    in neither."""
    if isinstance(cond, Conditioning) != isinstance(uncond, Conditioning):
        raise TypeError(f"cannot join a {type(cond).__name__} with a {type(uncond).__name__}")
    if isinstance(cond, Conditioning):
        parts = {}
        for f in fields(cond):
            a, b = getattr(cond, f.name), getattr(uncond, f.name)
            if (a is None) != (b is None):
                raise ValueError(f"conditioning field {f.name!r} is set in only one of the two halves")
            parts[f.name] = None if a is None else join(a, b)
        return Conditioning(**parts)
    uncond = uncond.to(cond.device)
    if uncond.shape[0] == 1 and cond.shape[0] != 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    return torch.cat([cond, uncond])
