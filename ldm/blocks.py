"""Convolutional building blocks shared by the UNet and the VAE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn



def cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory when it is an image batch on the CPU; models convert their input once and
    every layer keeps the layout. On the CPU whole steps run faster on it (a CIFAR-10 UNet training step 5 %,
    an SD 1.5 bf16 UNet step 1.5 %) and attention's ``b c h w → b (h w) c`` becomes a view; models return the
    default layout so callers can ``view`` their outputs. On GPUs the layout is left to the caller."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.dim() == 4 else x


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity  [Nichol & Dhariwal 2021, App. A]."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal features of the timestep  [Vaswani et al. 2017, §3.5; Ho et al. 2020, App. B].

        ω_i = exp(−ln(10000) · i / (dim/2 − freq_shift)),  i = 0 … dim/2 − 1
        emb(t) = [cos(t·ω), sin(t·ω)]   (or [sin, cos] when flip_sin_to_cos is False)
    Stable Diffusion uses cos-first with shift 0; the original DDPM code sin-first with shift 1.
    Shapes: t (B,) → (B, dim).
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * exponent.exp()[None, :]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a guidance scale, the "w-embedding" an LCM-distilled UNet reads  [Luo et al. 2023, §4.2;
    diffusers' ``get_guidance_scale_embedding``, after VDM's]: the timestep features of 1000·w, sin first, with
    frequencies ω_i = exp(−ln(10000) · i / (dim/2 − 1)):

        emb(w) = [sin(1000 w · ω), cos(1000 w · ω)]   (a zero appended when dim is odd)
    which is ``timestep_embedding(1000 w, dim, flip_sin_to_cos=False, freq_shift=1)``, but rounded as diffusers
    rounds it (the rate ln(10000)/(dim/2 − 1) first, in float32): at arguments up to ~10⁴ the two float32 orders
    differ by 5·10⁻⁴, which an LCM's images would carry. Shapes: w (B,) → (B, dim).
    """
    half = dim // 2
    rate = torch.log(torch.tensor(10000.0)) / (half - 1)
    omega = torch.exp(torch.arange(half, dtype=torch.float32) * -rate).to(w.device)
    args = (w.float() * 1000.0)[:, None] * omega[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features → Linear → SiLU → Linear: t (B,) → (B, emb_dim).

    With ``cond_dim`` (an LCM-distilled UNet's ``time_cond_proj_dim``) a bias-free projection of a condition
    (B, cond_dim) — the w-embedding of the guidance scale — is added to the sinusoidal features before the first
    Linear (diffusers' ``TimestepEmbedding(cond_proj_dim=…)``)."""

    def __init__(self, channels: int, emb_dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                 cond_dim: int | None = None):
        super().__init__()
        self.channels, self.flip_sin_to_cos, self.freq_shift = channels, flip_sin_to_cos, freq_shift
        self.cond_proj = nn.Linear(cond_dim, channels, bias=False) if cond_dim else None
        self.linear_1 = nn.Linear(channels, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = timestep_embedding(t, self.channels, self.flip_sin_to_cos, self.freq_shift).to(self.linear_1.weight.dtype)
        if self.cond_proj is not None:
            emb = emb + self.cond_proj(cond.to(emb))
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and SiLU, a skip connection, and optional time conditioning.

        h = conv₁(SiLU(GN(x)))
        h = h + W·SiLU(emb)                       (additive, DDPM)
          or GN(h)·(1 + s) + b, [s, b] = W·SiLU(emb)  (scale-shift, "adaptive GroupNorm")
        out = skip(x) + conv₂(dropout(SiLU(GN(h))))        [Ho et al. 2020; Nichol & Dhariwal 2021, §3]
    ``emb_channels=None`` gives the unconditioned block a VAE uses.
    Shapes: x (B, C_in, H, W), emb (B, E) → (B, C_out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int | None = None,
        *,
        dropout: float = 0.0,
        groups: int = 32,
        eps: float = 1e-5,
        scale_shift: bool = False,
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = (
            nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)) if emb_channels is not None else None
        )
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is None:
            h = self.norm2(h)
        else:
            if emb is None:
                raise ValueError("this ResBlock is time-conditioned: pass an embedding")
            e = self.time_emb_proj(F.silu(emb))[:, :, None, None]
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 convolution.

    ``asymmetric_padding`` pads only right and bottom by one, as the original TF DDPM
    and the Stable Diffusion VAE do; otherwise 1 pixel on every side.
    """

    def __init__(self, channels: int, asymmetric_padding: bool = False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (or reach ``size``, the skip connection's, after an odd-sized downsampling):
    nearest-neighbour, then a 3×3 convolution (avoids checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
