"""Where each word of a prompt acts: the UNet's cross-attention probabilities, gathered per token.

At a cross-attention layer every latent pixel i spreads one unit of attention over the context's tokens j,

    A = softmax(Q Kᵀ / √d),   Q = W_q x (the pixels' features),  K = W_k c (the text encoder's states)
                                                                        [Rombach et al. 2022, Eq. 3]

so column j of A, laid out on the layer's grid, is a map of the pixels that read token j. Averaged over heads,
layers (each enlarged to the largest grid) and denoising steps, these are Prompt-to-Prompt's cross-attention maps
[Hertz et al. 2022, §3.1]: the pixels "seven" draws, the side "on the left" pushes the digit to.

    with CrossAttentionMaps(pipe.unet) as maps:
        pipe("a thick seven on the left", guidance_scale=3)
    maps.mean()            # (2, S, H, W): guidance runs [prompt; negative] as one batch (``conditioning.join``)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import TransformerBlock


class CrossAttentionMaps:
    """Records the cross-attention maps of every ``TransformerBlock.attn2`` of ``unet`` while in the ``with``
    block; ``mean()`` is their average (B, S, H, W), S the context's tokens, H × W the largest grid seen."""

    def __init__(self, unet: nn.Module):
        self.layers = [block.attn2 for block in unet.modules() if isinstance(block, TransformerBlock)]
        if not self.layers:
            raise ValueError("this UNet has no cross-attention layers (a class-label or unconditional model)")
        self.maps: list[torch.Tensor] = []
        self.hooks: list = []

    def __enter__(self) -> "CrossAttentionMaps":
        self.maps.clear()
        self.hooks = [layer.register_forward_hook(self.record) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    @torch.no_grad()
    def record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x, context = inputs[0], inputs[1] if len(inputs) > 1 else None
        if context is None:
            raise ValueError("the UNet ran without a context: nothing for its cross-attention maps to show")
        B, L, _ = x.shape
        side = round(L ** 0.5)
        if side * side != L:
            raise ValueError(f"a cross-attention layer over {L} pixels: only square grids are laid out as maps")
        q = layer.to_q(x).float().unflatten(-1, (layer.heads, -1)).transpose(1, 2)          # (B, h, L, d)
        k = layer.to_k(context).float().unflatten(-1, (layer.heads, -1)).transpose(1, 2)    # (B, h, S, d)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)        # (B, h, L, S)
        self.maps.append(probs.mean(1).transpose(1, 2).unflatten(-1, (side, side)).cpu())  # (B, S, side, side)

    def mean(self) -> torch.Tensor:
        """The recorded maps averaged, each enlarged (bilinear) to the largest grid: (B, S, H, W), each pixel's
        values over the S tokens summing to 1."""
        if not self.maps:
            raise ValueError("no cross-attention was recorded: run the pipeline inside the `with` block")
        size = max(m.shape[-1] for m in self.maps)
        return torch.stack([F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
                            for m in self.maps]).mean(0)

    def words(self, tokenizer, prompt: str, index: int = 0) -> list[tuple[str, torch.Tensor]]:
        """(token, map (H, W)) for each token of ``prompt`` between the start and end tokens, from row ``index``
        of ``mean()``: the prompt's own maps, with ``tokenizer`` framing it as the pipeline did."""
        ids = tokenizer.encode(prompt)[: tokenizer.max_length - 2]
        maps = self.mean()[index]
        return [(tokenizer.decode([i]), maps[1 + n]) for n, i in enumerate(ids)]
