"""TAESD, the tiny autoencoder for Stable Diffusion's latents [madebyollin/taesd].

TAESD is a pair of small convolutional networks (about 1.2 M parameters each) distilled from Stable Diffusion's VAE:
the decoder turns the latents the UNet works in into an image at a few per cent of the VAE's cost (live previews
while sampling, or a cheap final decode), the encoder turns an image into such latents. It speaks the same "latent
API" as the VAE it imitates, with one convenience: it takes the *scaled* latents, z_model = s · z_VAE (s = 0.18215
for SD 1/2, 0.13025 for SDXL), so no scaling factor is applied on the way in or out. ``taesd`` is trained for the
SD 1/2 latent space, ``taesdxl`` for SDXL's; the two have the same shapes and differ only in their weights.

Data flow (f = 8 for the released weights; every convolution 3×3, padding 1, unless noted):
    encoder: x ∈ [0, 1] (B, 3, H, W) ─conv_in─► stage 0 ─► ⋯ ─► stage 3 ─conv_out─► z (B, 4, H/8, W/8), ≈ [−3, 3]
             stage k > 0 opens with a stride-2 convolution (no bias), then Blocks
    decoder: z ─3·tanh(z/3)─► conv_in ─ReLU─► stage 0 ─► ⋯ ─► stage 3 ─conv_out─► x (B, 3, H, W), ≈ [0, 1]
             each stage but the last: Blocks, nearest-neighbour ×2, a convolution (no bias)
    Block:   x ↦ ReLU(conv₃(ReLU(conv₂(ReLU(conv₁(x))))) + x)

The networks work on images in [0, 1], as in the original; ``AutoencoderTiny.encode`` / ``decode`` take and give
images in [−1, 1], ldm's (and diffusers') convention. Weights load through ``ldm.convert.taesd.load_taesd``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import cpu_channels_last


@dataclass(frozen=True)
class TAESDConfig:
    """The shape of a TAESD: one width throughout; the number of Blocks per stage (one stage per resolution)."""

    image_channels: int = 3
    latent_channels: int = 4
    width: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0  # for scale_latents: z ∈ [−3, 3] ↔ [0, 1]
    latent_shift: float = 0.5

    def with_(self, **changes) -> "TAESDConfig":
        return replace(self, **changes)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """Three 3×3 convolutions with ReLUs between, a skip, and a ReLU after the sum ("fuse"):
        Block(x) = ReLU(conv₃(ReLU(conv₂(ReLU(conv₁(x))))) + x)
    Shapes: (B, D, h, w) → (B, D, h, w)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = conv3x3(width, width), conv3x3(width, width), conv3x3(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(h + x)


class EncoderStage(nn.Module):
    """One resolution of the encoder: (a stride-2 convolution, halving h and w, unless it is the first) then Blocks."""

    def __init__(self, width: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.down = conv3x3(width, width, stride=2, bias=False) if downsample else None
        self.blocks = nn.ModuleList(Block(width) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        for block in self.blocks:
            x = block(x)
        return x


class DecoderStage(nn.Module):
    """One resolution of the decoder: Blocks, then (unless it is the last) nearest ×2 and a convolution, no bias."""

    def __init__(self, width: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(num_blocks))
        self.up = conv3x3(width, width, bias=False) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.up is not None:
            x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class TinyEncoder(nn.Module):
    """Image in [0, 1] (B, C_img, H, W) → latents (B, C_z, H/f, W/f), in SD's model space (VAE z · its scale)."""

    def __init__(self, config: TAESDConfig):
        super().__init__()
        d = config.width
        self.conv_in = conv3x3(config.image_channels, d)
        self.stages = nn.ModuleList(EncoderStage(d, n, downsample=k > 0) for k, n in enumerate(config.encoder_blocks))
        self.conv_out = conv3x3(d, config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(cpu_channels_last(x))
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(x).contiguous()


class TinyDecoder(nn.Module):
    """Latents in model space (B, C_z, h, w) → image in about [0, 1] (B, C_img, h·f, w·f), not clamped.

    The latents are first squashed softly into (−3, 3) by 3·tanh(z/3) ("Clamp" in the original): near-identity for
    |z| ≲ 1, so the decoder never sees the extreme values an early, noisy x̂₀ can hold."""

    def __init__(self, config: TAESDConfig):
        super().__init__()
        d, last = config.width, len(config.decoder_blocks) - 1
        self.conv_in = conv3x3(config.latent_channels, d)
        self.stages = nn.ModuleList(DecoderStage(d, n, upsample=k < last) for k, n in enumerate(config.decoder_blocks))
        self.conv_out = conv3x3(d, config.image_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv_in(cpu_channels_last(torch.tanh(z / 3) * 3)))
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(x).contiguous()


class AutoencoderTiny(nn.Module):
    """TAESD [madebyollin/taesd]: a tiny encoder and decoder for Stable Diffusion's latent space.

    ``encode``: images in [−1, 1] (B, 3, H, W) → latents (B, 4, H/8, W/8) in model space (what the UNet denoises:
    the SD VAE's z times its scaling factor, 0.18215 for SD 1/2); ``decode``: such latents → images in about
    [−1, 1] (B, 3, H, W), not clamped. H and W are multiples of 8 for ``encode``.

    Either half may be absent (``encoder=None``: a decoder file alone, enough for previews); ``encode`` then says so.
    ``family`` is the latent space the weights were trained for — "sd" (SD 1/2), "sdxl", or "unknown" — which the
    weights cannot tell (both have the same shapes): the loader reads it from the file name or the caller.
    ``source`` names where the weights came from, for messages.
    """

    def __init__(self, config: TAESDConfig = TAESDConfig(), encoder: bool = True, decoder: bool = True,
                 family: str = "unknown", source: str = "TAESD"):
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("a TAESD needs an encoder, a decoder or both")
        self.config, self.family, self.source = config, family, source
        self.encoder = TinyEncoder(config) if encoder else None
        self.decoder = TinyDecoder(config) if decoder else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] (B, 3, H, W) → latents in model space (B, 4, H/8, W/8)."""
        if self.encoder is None:
            raise RuntimeError(f"{self.source} holds only TAESD's decoder, so it cannot encode images: load the "
                               "matching *_encoder file too (a folder holding both, or a diffusers AutoencoderTiny)")
        return self.encoder((images + 1) / 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in model space (B, 4, h, w) → images in about [−1, 1] (B, 3, 8h, 8w)."""
        if self.decoder is None:
            raise RuntimeError(f"{self.source} holds only TAESD's encoder, so it cannot decode latents: load the "
                               "matching *_decoder file too")
        return self.decoder(latents) * 2 - 1

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → [0, 1], for storing as 8-bit images: z / (2·m) + shift, clamped (m = 3, shift = 0.5)."""
        return (latents / (2 * self.config.latent_magnitude) + self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, scaled: torch.Tensor) -> torch.Tensor:
        """The inverse of ``scale_latents`` (for latents that were in [−m, m]): (s − shift) · 2·m."""
        return (scaled - self.config.latent_shift) * (2 * self.config.latent_magnitude)


__all__ = ["AutoencoderTiny", "Block", "TAESDConfig", "TinyDecoder", "TinyEncoder"]


def latent_space(family: str) -> str:
    """The latent space of a Stable Diffusion family: "sd1…", "sd2…" (one VAE) → "sd"; "sdxl…" → "sdxl"."""
    if family.startswith("sdxl"):
        return "sdxl"
    if family == "sd" or family.startswith(("sd1", "sd2")):
        return "sd"
    raise ValueError(f"no TAESD for the {family!r} family here: TAESD covers SD 1/2 (\"sd\") and SDXL (\"sdxl\")")
