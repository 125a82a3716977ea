"""Multi-head attention over image positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .blocks import zero_init


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V per head  [Vaswani et al. 2017, Eq. 1], via ``F.scaled_dot_product_attention``.

    Shapes: q (B, L, D), k and v (B, S, D) with D = heads · d; mask (B, S) bool, True = attend.
    Returns (B, L, D).
    """
    q, k, v = (rearrange(x, "b l (h d) -> b h l d", h=heads) for x in (q, k, v))
    attn_mask = mask[:, None, None, :] if mask is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return rearrange(out, "b h l d -> b l (h d)")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        h = multihead_attention(self.to_q(h), self.to_k(h), self.to_v(h), self.heads)
        return x + rearrange(self.to_out(h), "b (h w) c -> b c h w", h=H, w=W)
