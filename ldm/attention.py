"""Multi-head attention over image positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .blocks import zero_init


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V per head  [Vaswani et al. 2017, Eq. 1], via ``F.scaled_dot_product_attention``.

    Shapes: q (B, L, D), k and v (B, S, D) with D = heads · d; mask (B, S) bool, True = attend.
    Returns (B, L, D). ``chunk`` attends that many queries at a time ("sliced attention"): rows of the
    softmax are independent, so the result is the same, while a backend that materialises the
    L × S score matrix holds only chunk × S of it — for large images.
    """
    q, k, v = (rearrange(x, "b l (h d) -> b h l d", h=heads) for x in (q, k, v))
    attn_mask = mask[:, None, None, :] if mask is not None else None
    if chunk is None or chunk >= q.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v, attn_mask=attn_mask)
                         for i in range(0, q.shape[2], chunk)], dim=2)
    return rearrange(out, "b h l d -> b l (h d)")


def set_attention_chunk(model: nn.Module, chunk: int | None) -> None:
    """Make every attention layer in ``model`` attend ``chunk`` queries at a time (None: all at once)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention chunk must be >= 1 or None, got {chunk}")
    for module in model.modules():
        if isinstance(module, (SelfAttentionBlock, CrossAttention)):
            module.chunk = chunk


class SelfAttentionBlock(nn.Module):
    """Residual self-attention over all H·W positions, as in the DDPM UNet  [Ho et al. 2020, App. B].

        out = x + W_o · Attention(W_q·GN(x), W_k·GN(x), W_v·GN(x))
    Shapes: x (B, C, H, W) → (B, C, H, W). ``head_dim`` sets heads = C / head_dim.
    """

    def __init__(self, channels: int, head_dim: int, *, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention channels {channels} not divisible by head_dim {head_dim}")
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = zero_init(nn.Linear(channels, channels))
        self.chunk: int | None = None  # see set_attention_chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        h = multihead_attention(self.to_q(h), self.to_k(h), self.to_v(h), self.heads, chunk=self.chunk)
        return x + rearrange(self.to_out(h), "b (h w) c -> b c h w", h=H, w=W)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens x to a context sequence (itself when context is None).

        Attention(W_q x, W_k c, W_v c) → W_o          [Rombach et al. 2022, Eq. 3]
    Shapes: x (B, L, D), context (B, S, D_c), mask (B, S) bool (True = attend) → (B, L, D).
    Q/K/V have no bias, as in Stable Diffusion.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.chunk: int | None = None  # see set_attention_chunk

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(multihead_attention(q, k, v, self.heads, mask, self.chunk))


class GEGLU(nn.Module):
    """Gated feed-forward: (x W + b) ⊙ GELU(x V + c), then a linear layer  [Shazeer 2020, Eq. 6]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """x += SelfAttn(LN(x)); x += CrossAttn(LN(x), context); x += FF(LN(x))  (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), CrossAttention(dim, heads, head_dim)
        self.norm2, self.attn2 = nn.LayerNorm(dim), CrossAttention(dim, heads, head_dim, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable Diffusion's attention block: GN → proj_in → TransformerBlocks over the H·W tokens → proj_out, residual.

    ``linear_projection`` picks linear proj_in/out (SD 2, SDXL) over 1×1 convolutions (SD 1).
    Shapes: x (B, C, H, W), context (B, S, D_c) → (B, C, H, W).
    """

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, *, depth: int = 1,
                 groups: int = 32, linear_projection: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth))
        proj_out = nn.Linear(inner, channels) if linear_projection else nn.Conv2d(inner, channels, 1)
        self.proj_out = zero_init(proj_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _, _, H, W = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.linear_projection:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=H, w=W)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=H, w=W))
        return x + h
