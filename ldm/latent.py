"""Latent diffusion's data side: a trained VAE, and a dataset of cached latents to train a UNet on.

Diffusion runs on z = s · E(x), with s the VAE's scaling factor, and images come back as
x = D(z / s)  [Rombach et al. 2022, §3.3]. Encoding every image once and keeping the posterior
(μ, σ) makes an epoch over latents as cheap as reading them; each batch still draws a fresh
z ~ N(μ, σ²), as encoding on the fly would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import ImageDataset
from .vae import AutoencoderKL


@dataclass
class LatentDataset:
    """Cached posteriors of a dataset's images; ``batch`` returns scaled latent samples.

    Same interface as ``ImageDataset`` (``batch``, ``len``, ``image_size``, ``channels``,
    ``num_classes``), so the trainer does not care which one it holds.
    """

    mean: torch.Tensor  # (N, z, h, w)
    std: torch.Tensor  # (N, z, h, w)
    labels: torch.Tensor | None
    num_classes: int | None
    scaling_factor: float
    name: str = ""

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def image_size(self) -> int:
        return self.mean.shape[-1]

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        """s · (μ + σ ε) for the chosen images, and their labels."""
        mean, std = self.mean[indices], self.std[indices]
        eps = torch.randn(mean.shape, generator=generator)
        labels = self.labels[indices] if self.labels is not None else None
        return self.scaling_factor * (mean + std * eps), labels


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, data: ImageDataset, *, device: str | torch.device = "cpu",
                   batch_size: int = 256, progress: bool = True) -> LatentDataset:
    """Encode every image once (no flips: augmentation would have to happen before encoding)."""
    means, stds = [], []
    for start in tqdm(range(0, len(data), batch_size), desc="encoding dataset", disable=not progress, leave=False):
        x, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        posterior = vae.encode(x.to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return LatentDataset(torch.cat(means), torch.cat(stds), data.labels, data.num_classes,
                         vae.config.scaling_factor, name=f"{data.name} latents")
