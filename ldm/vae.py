"""The KL-regularised autoencoder of latent diffusion (Stable Diffusion's "AutoencoderKL").

Data flow:
    x (B, C, H, W) ─Encoder─► (B, 2z, H/f, W/f) ─quant_conv─► mean, log σ² ─sample/mode─► z
    z ─post_quant_conv─► Decoder ─► x̂ (B, C, H, W)
The diffusion model works on z · scaling_factor, which has roughly unit variance
[Rombach et al. 2022, §3 and App. G; Kingma & Welling 2014].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttentionBlock
from .blocks import Downsample, ResBlock, Upsample


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
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """z (B, z, h, w) → (B, C, h·f, w·f): mid attention, then ResBlocks and nearest-neighbour upsampling."""

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
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


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

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"VAE expects images of shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        f = c.downsample_factor
        if H % f or W % f:
            raise ValueError(f"image size {H}×{W} is not a multiple of the VAE's downsampling factor {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Latents (B, z, h, w) → images (B, C, h·f, w·f). With ``tile``, latents larger than tile×tile are
        decoded in overlapping tiles, so memory stays that of one tile (for large images)."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE decodes latents of shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        if tile is None or max(z.shape[-2:]) <= tile:
            return self.decoder(self.post_quant_conv(z))
        return self._decode_tiled(z, tile)

    def _decode_tiled(self, z: torch.Tensor, tile: int) -> torch.Tensor:
        """Decode tile×tile windows that overlap by a quarter tile and cross-fade them with linear ramps.

        Each window sees only its own latents (the mid attention becomes local), so seams are hidden by
        blending rather than avoided; the result is close to, not equal to, a whole decode.
        """
        if tile < 4:
            raise ValueError(f"tile must be at least 4 latent pixels, got {tile}")
        f, overlap = self.config.downsample_factor, tile // 4
        H, W = z.shape[-2:]
        out = weight = None
        for y in _tile_starts(H, tile, tile - overlap):
            for x in _tile_starts(W, tile, tile - overlap):
                piece = self.decoder(self.post_quant_conv(z[..., y : y + tile, x : x + tile]))
                ramp_y = _ramp(piece.shape[-2], overlap * f, y > 0, y + tile < H).to(piece)
                ramp_x = _ramp(piece.shape[-1], overlap * f, x > 0, x + tile < W).to(piece)
                w = ramp_y[:, None] * ramp_x[None, :]
                if out is None:
                    out = piece.new_zeros(*piece.shape[:2], H * f, W * f)
                    weight = piece.new_zeros(H * f, W * f)
                out[..., y * f : y * f + piece.shape[-2], x * f : x * f + piece.shape[-1]] += piece * w
                weight[y * f : y * f + piece.shape[-2], x * f : x * f + piece.shape[-1]] += w
        return out / weight

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled latent; returns (x̂, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


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
