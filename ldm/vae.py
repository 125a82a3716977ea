"""The KL-regularised autoencoder of latent diffusion (Stable Diffusion's "AutoencoderKL").

Data flow:
    x (B, C, H, W) ─Encoder─► (B, 2z, H/f, W/f) ─quant_conv─► mean, log σ² ─sample/mode─► z
    z ─post_quant_conv─► Decoder ─► x̂ (B, C, H, W)
The diffusion model works on z · scaling_factor, which has roughly unit variance
[Rombach et al. 2022, §3 and App. G; Kingma & Welling 2014].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttentionBlock
from .blocks import Downsample, ResBlock, Upsample, cpu_channels_last
from .gradient_checkpointing import run_stage


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; f = 2^(levels − 1)
    num_res_blocks: int = 2
    mid_attention: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215  # z fed to diffusion = scaling_factor · z; 1/std of latents for a trained VAE

    def with_(self, **changes) -> "VAEConfig":
        return replace(self, **changes)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd(cls) -> "VAEConfig":
        """Stable Diffusion 1.x/2.x: 8× downsampling, 4 latent channels, 83.7 M parameters."""
        return cls()

    @classmethod
    def mnist(cls) -> "VAEConfig":
        """32×32 digits → 2×8×8 latents (4× downsampling); scaling_factor is set from data after training."""
        return cls(in_channels=1, out_channels=1, latent_channels=2, channels=32, channel_mult=(1, 2, 2),
                   num_res_blocks=1, norm_groups=8, scaling_factor=1.0)

    @classmethod
    def cifar10(cls) -> "VAEConfig":
        """32×32 colour images → 4×8×8 latents."""
        return cls(in_channels=3, out_channels=3, latent_channels=4, channels=64, channel_mult=(1, 2, 2),
                   num_res_blocks=1, norm_groups=32, scaling_factor=1.0)


class DiagonalGaussian:
    """q(z | x) = N(μ, diag σ²) from the encoder's 2z channels; log σ² clamped to [−30, 20] for stability.

        KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²)          [Kingma & Welling 2014, App. B]
    Shapes: parameters (B, 2z, h, w) → mean, logvar (B, z, h, w); kl (B,).
    """

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = self.std**2

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ε (the reparameterisation trick), ε from ``generator``'s device."""
        g_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=g_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar).flatten(1).sum(1)


def _mid(ch: int, groups: int, eps: float, attention: bool) -> nn.Sequential:
    layers = [ResBlock(ch, ch, groups=groups, eps=eps)]
    if attention:
        layers.append(SelfAttentionBlock(ch, head_dim=ch, groups=groups, eps=eps))  # one head, as in SD
    layers.append(ResBlock(ch, ch, groups=groups, eps=eps))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (B, C, H, W) → (B, 2z, H/f, W/f): ResBlocks, stride-2 downsampling (padded right/bottom), mid attention."""

    gradient_checkpointing = False  # recompute each stage in backward (ldm.gradient_checkpointing)

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.channels
        for level, mult in enumerate(c.channel_mult):
            layers: list[nn.Module] = []
            for _ in range(c.num_res_blocks):
                layers.append(ResBlock(ch, c.channels * mult, groups=c.norm_groups, eps=c.norm_eps))
                ch = c.channels * mult
            if level < len(c.channel_mult) - 1:
                layers.append(Downsample(ch, asymmetric_padding=True))
            self.down.append(nn.Sequential(*layers))
        self.mid = _mid(ch, c.norm_groups, c.norm_eps, c.mid_attention)
        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(cpu_channels_last(x))
        for stage in self.down:
            h = run_stage(self, stage, h)
        return self.conv_out(F.silu(self.norm_out(run_stage(self, self.mid, h)))).contiguous()


class Decoder(nn.Module):
    """z (B, z, h, w) → (B, C, h·f, w·f): mid attention, then ResBlocks and nearest-neighbour upsampling."""

    gradient_checkpointing = False  # recompute each stage in backward (ldm.gradient_checkpointing)

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.channels * c.channel_mult[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, ch, 3, padding=1)
        self.mid = _mid(ch, c.norm_groups, c.norm_eps, c.mid_attention)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            layers: list[nn.Module] = []
            for _ in range(c.num_res_blocks + 1):
                layers.append(ResBlock(ch, c.channels * mult, groups=c.norm_groups, eps=c.norm_eps))
                ch = c.channels * mult
            if level > 0:
                layers.append(Upsample(ch))
            self.up.append(nn.Sequential(*layers))
        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_stage(self, self.mid, self.conv_in(cpu_channels_last(z)))
        for stage in self.up:
            h = run_stage(self, stage, h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


class AutoencoderKL(nn.Module):
    """Encoder + decoder with a diagonal-Gaussian bottleneck.

    ``encode`` returns the posterior (unscaled latents); ``decode`` takes unscaled latents.
    Latent diffusion multiplies by ``config.scaling_factor`` after encoding and divides before decoding.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    def encode(self, x: torch.Tensor, tile: int | None = None) -> DiagonalGaussian:
        """Images (B, C, H, W) → the posterior q(z | x) over latents (B, z, H/f, W/f). With ``tile`` (in latent
        pixels, as for ``decode``: image windows of tile·f pixels), larger images are encoded in overlapping
        windows whose posterior parameters are blended (``_tiled``), so memory stays that of one window."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"VAE expects images of shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        f = c.downsample_factor
        if H % f or W % f:
            raise ValueError(f"image size {H}×{W} is not a multiple of the VAE's downsampling factor {f}")
        # the mean and log-variance are blended, not samples: a sample drawn afterwards has no seams in its noise
        return DiagonalGaussian(_tiled(lambda window: self.quant_conv(self.encoder(window)), x, tile, f, 1))

    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Latents (B, z, h, w) → images (B, C, h·f, w·f). With ``tile`` (latent pixels), latents larger than
        tile×tile are decoded in overlapping tiles (``_tiled``), so memory stays that of one tile (large images)."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE decodes latents of shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        f = self.config.downsample_factor
        return _tiled(lambda window: self.decoder(self.post_quant_conv(window)), z, tile, 1, f)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent; returns (x̂, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


MIN_TILE = 4  # latent pixels: tiles overlap by a quarter tile, so at least one pixel


def check_tile(tile: int | None) -> None:
    """A VAE tile is None (no tiling) or at least ``MIN_TILE`` latent pixels."""
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < MIN_TILE):
        raise ValueError(f"VAE tile must be an integer of at least {MIN_TILE} latent pixels "
                         f"(tiles overlap by a quarter tile), or None for no tiling; got {tile!r}")


def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int | None, f_in: int,
           f_out: int) -> torch.Tensor:
    """``fn(x)``, computed over tile×tile windows (latent pixels) that overlap by a quarter tile and are
    cross-faded with linear ramps; encode and decode both run through here.

    ``x`` has ``f_in`` pixels per latent pixel and ``fn``'s output ``f_out`` (decode: 1 and f, encode: f and 1),
    so a window of tile·f_in input pixels gives tile·f_out output pixels. Each window sees only itself: its
    GroupNorm statistics, its mid attention and the convolutions' zero padding at its edges are local. Seams
    are therefore hidden by blending rather than avoided, and the result is close to, not equal to, ``fn(x)``;
    the ramps give a window's own edge (where padding makes it least like the whole) the least weight.
    Inputs that fit in one tile (or ``tile=None``) go through ``fn`` whole.
    """
    check_tile(tile)
    h, w = x.shape[-2] // f_in, x.shape[-1] // f_in
    if tile is None or max(h, w) <= tile:
        return fn(x)
    overlap = tile // 4
    out = weight = None
    for top in _tile_starts(h, tile, tile - overlap):
        for left in _tile_starts(w, tile, tile - overlap):
            piece = fn(x[..., top * f_in : (top + tile) * f_in, left * f_in : (left + tile) * f_in])
            ramp_y = _ramp(piece.shape[-2], overlap * f_out, top > 0, top + tile < h)
            ramp_x = _ramp(piece.shape[-1], overlap * f_out, left > 0, left + tile < w)
            blend = (ramp_y[:, None] * ramp_x[None, :]).to(piece.device)
            if out is None:  # float32 sums: bf16 would round the weights and the weighted pieces differently
                out = piece.new_zeros(*piece.shape[:2], h * f_out, w * f_out, dtype=torch.float32)
                weight = piece.new_zeros(h * f_out, w * f_out, dtype=torch.float32)
            rows = slice(top * f_out, top * f_out + piece.shape[-2])
            cols = slice(left * f_out, left * f_out + piece.shape[-1])
            out[..., rows, cols] += piece.float() * blend
            weight[rows, cols] += blend
    return (out / weight).to(piece.dtype)


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(n - tile, 0) + 1, stride))
    return starts if starts[-1] + tile >= n else starts + [n - tile]


def _ramp(length: int, overlap: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """Blend weights along one axis: rising over the first ``overlap`` pixels, falling over the last."""
    w = torch.ones(length)
    edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if fade_in:
        w[:overlap] = edge
    if fade_out:
        w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w
