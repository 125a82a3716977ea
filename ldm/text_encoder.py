"""The CLIP text transformer that turns token ids into the context a Stable Diffusion UNet attends to.

Data flow  [Radford et al. 2021, §2.4; GPT-2-style pre-LN blocks]:
    ids (B, L) ─E[ids] + P[:L]─► x₀ ─block₁ … block_N (causal self-attention)─► x_N
    hidden = LN_final(x_{N+1+output_layer})      what the UNet consumes (SD1: x_N, SD2: x_{N−1}),
          or x_{N+1+output_layer} unnormalised   (SDXL: x_{N−1} of both its encoders)
    pooled = LN_final(x_N)[first end token]      (· W_proj when projection_dim is set) — always the last block
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class TextEncoderConfig:
    """Defaults are OpenAI CLIP ViT-L/14's text tower (Stable Diffusion 1.x).

    output_layer: which block's output feeds the UNet, counted from the end (−1 last, −2 penultimate).
    final_norm_on_hidden: whether the final LayerNorm is applied to that output: SD1 (last block) and SD2
        (penultimate) do; SDXL takes both encoders' penultimate states as they are  [Podell et al. 2023, §2.1;
        diffusers' ``hidden_states[-2]``]. The pooled output is normalised in every case.
    projection_dim: width of the pooled output's linear projection (``text_projection``), or None for none.
    eos_token_id: the pooled output is read at the first occurrence of this id in each row.
    """

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    output_layer: int = -1
    final_norm_on_hidden: bool = True
    projection_dim: int | None = None
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not -self.layers <= self.output_layer <= -1:
            raise ValueError(f"output_layer must be in [-{self.layers}, -1] (counted from the end); got {self.output_layer}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu'; got {self.activation!r}")

    def with_(self, **changes) -> "TextEncoderConfig":
        return replace(self, **changes)

    @classmethod
    def clip_vit_l14(cls) -> "TextEncoderConfig":
        """OpenAI CLIP ViT-L/14 text tower, last layer (Stable Diffusion 1.x): 123,060,480 parameters."""
        return cls()

    @classmethod
    def openclip_vit_h14(cls) -> "TextEncoderConfig":
        """OpenCLIP ViT-H/14 text tower, penultimate layer (Stable Diffusion 2.x). All 24 blocks are held so
        that single files load completely; the last one only runs for the pooled output."""
        return cls(width=1024, layers=24, heads=16, mlp_dim=4096, activation="gelu", output_layer=-2)

    @classmethod
    def clip_vit_l14_sdxl(cls) -> "TextEncoderConfig":
        """SDXL's first encoder: OpenAI CLIP ViT-L/14, penultimate block, no final LayerNorm (768 of the 2048
        context channels). Its pooled output goes unused; all 12 blocks are held so that single files load."""
        return cls(output_layer=-2, final_norm_on_hidden=False)

    @classmethod
    def openclip_vit_bigg14(cls) -> "TextEncoderConfig":
        """SDXL's second encoder: OpenCLIP ViT-bigG/14 text tower (694,659,840 parameters), penultimate block without
        the final LayerNorm (the other 1280 context channels), and the projected pooled output (1280), which
        enters the UNet's added conditioning  [Podell et al. 2023, §2.1–2.2]. All 32 blocks: the pooled output
        needs the last."""
        return cls(width=1280, layers=32, heads=20, mlp_dim=5120, activation="gelu", output_layer=-2,
                   final_norm_on_hidden=False, projection_dim=1280)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · σ(1.702 x): the sigmoid approximation of GELU(x) = x · Φ(x)  [Hendrycks & Gimpel 2016, §2], which
    OpenAI's CLIP was trained with; the exact GELU would shift its outputs, so the two are kept apart."""
    return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position i sees positions j ≤ i  [Vaswani et al. 2017, Eq. 1]:

        Attention(Q, K, V) = softmax(Q Kᵀ / √d + M) V,   M_ij = −∞ for j > i, else 0
    Shapes: x (B, L, D) → (B, L, D); d = D / heads.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(rearrange(h, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    """W₂ · φ(W₁ x + b₁) + b₂ with φ = quick-GELU or GELU. Shapes: (B, L, D) → (B, L, D)."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.activation = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class TextBlock(nn.Module):
    """Pre-LN transformer block:  h = x + Attn(LN₁(x));  out = h + MLP(LN₂(h)).  Shapes: (B, L, D) → (B, L, D)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, activation: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass
class TextEncoderOutput:
    """hidden (B, L, D): the UNet's context; pooled (B, D) or (B, projection_dim): one vector per prompt."""

    hidden: torch.Tensor
    pooled: torch.Tensor


class TextEncoder(nn.Module):
    """CLIP's text transformer  [Radford et al. 2021]:

        x₀ = E[ids] + P[0:L]           token and learned position embeddings
        x_n = block_n(x_{n−1})          n = 1 … N, causal self-attention
        hidden = LN_final(x_{N+1+output_layer})   (x_{N+1+output_layer} when final_norm_on_hidden is False)
    ``forward`` returns ``hidden`` and runs only the blocks it needs; ``encode`` also returns the pooled vector.
    E is ``token_embedding`` with ``extra_embeddings`` (textual inversion's rows) below it: ``set_extra_embeddings``.
    Shapes: token_ids (B, L) integer, L ≤ max_length → (B, L, width).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Parameter(torch.empty(c.max_length, c.width))
        self.layers = nn.ModuleList(TextBlock(c.width, c.heads, c.mlp_dim, c.activation, c.layer_norm_eps)
                                    for _ in range(c.layers))
        self.final_norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.projection = nn.Linear(c.width, c.projection_dim, bias=False) if c.projection_dim else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation of both tables
        nn.init.normal_(self.position_embedding, std=0.01)
        # Not persistent: the weight files and the converters keep CLIP's own vocabulary (see set_extra_embeddings).
        self.register_buffer("extra_embeddings", None, persistent=False)

    @property
    def num_tokens(self) -> int:
        """How many ids the encoder reads: the vocabulary and the extra rows."""
        extra = self.extra_embeddings
        return self.config.vocab_size + (0 if extra is None else len(extra))

    def set_extra_embeddings(self, rows: torch.Tensor | None) -> None:
        """Rows for the ids past the vocabulary: id vocab_size + k reads ``rows[k]`` (n, width), or None for none.

        Textual inversion  [Gal et al. 2022, Eq. 2]: a new word S* is one such row v*, learned with the encoder
        (and everything else) frozen,  v* = argmin_v E ‖ε − ε_θ(z_t, t, c_θ(y with S* ↦ v))‖².
        ``rows`` is kept as given, not copied, as a non-persistent buffer: it follows ``.to()`` but stays out of
        ``state_dict`` (weight files, converters). To learn rows, pass an ``nn.Parameter`` (after moving the
        encoder: ``.to()`` replaces buffers with converted copies), freeze the rest (``requires_grad_(False)``
        leaves buffers alone) and hand the same Parameter to the optimizer; gradients reach it through
        ``embed_tokens``.
        """
        if rows is not None and (rows.dim() != 2 or rows.shape[1] != self.config.width):
            raise ValueError(f"extra embeddings must be (n, {self.config.width}) for this {self.config.width}-wide "
                             f"encoder; got {tuple(rows.shape)}")
        self.register_buffer("extra_embeddings", None if rows is None or not len(rows) else rows, persistent=False)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """E[ids] with E = [token_embedding; extra_embeddings]: ids ≥ vocab_size read the extra rows.
        Shapes: (B, L) → (B, L, width)."""
        extra = self.extra_embeddings
        if extra is None:
            return self.token_embedding(token_ids)
        vocab = self.config.vocab_size
        # Two lookups and a select, not one lookup in a concatenated table: no copy of the 49408-row table per call.
        base = self.token_embedding(token_ids.clamp(max=vocab - 1))
        added = extra.to(base.dtype)[(token_ids - vocab).clamp(min=0)]
        return torch.where((token_ids >= vocab)[..., None], added, base)

    def check_ids(self, token_ids: torch.Tensor) -> None:
        """Raise ValueError unless token_ids is an integer (B, L) tensor with L ≤ max_length and ids in
        [0, num_tokens) (the vocabulary and any extra rows)."""
        c = self.config
        if not isinstance(token_ids, torch.Tensor) or token_ids.dtype.is_floating_point or token_ids.dtype.is_complex \
                or token_ids.dtype == torch.bool:
            kind = token_ids.dtype if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
            raise ValueError(f"token ids must be an integer tensor; got {kind}")
        if token_ids.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, length); got {tuple(token_ids.shape)}")
        if token_ids.shape[1] > c.max_length:
            raise ValueError(f"{token_ids.shape[1]} tokens, but the text encoder takes at most {c.max_length}")
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= self.num_tokens):
            raise ValueError(f"token ids must lie in [0, {self.num_tokens}); got range "
                             f"[{int(token_ids.min())}, {int(token_ids.max())}]")

    def _blocks(self, token_ids: torch.Tensor, count: int) -> list[torch.Tensor]:
        """[x₀, x₁, …, x_count]: the embeddings and the outputs of the first ``count`` blocks."""
        self.check_ids(token_ids)
        x = self.embed_tokens(token_ids.long()) + self.position_embedding[: token_ids.shape[1]]
        states = [x]
        for block in self.layers[:count]:
            states.append(block(states[-1]))
        return states

    def _hidden(self, state: torch.Tensor) -> torch.Tensor:
        return self.final_norm(state) if self.config.final_norm_on_hidden else state

    def _output_layer(self, output_layer: int | None) -> int:
        if output_layer is None:
            return self.config.output_layer
        if not -self.config.layers <= output_layer <= -1:
            raise ValueError(f"output_layer must be in [-{self.config.layers}, -1] (counted from the end); "
                             f"got {output_layer}")
        return output_layer

    def forward(self, token_ids: torch.Tensor, output_layer: int | None = None) -> torch.Tensor:
        """The hidden states the UNet attends to, from block ``output_layer`` counted from the end (default: the
        config's; the final norm as the config says — clip skip). Shapes: (B, L) → (B, L, width)."""
        used = self.config.layers + 1 + self._output_layer(output_layer)  # SD2 and SDXL never run the last block
        return self._hidden(self._blocks(token_ids, used)[-1])

    def encode(self, token_ids: torch.Tensor, output_layer: int | None = None) -> TextEncoderOutput:
        """Hidden states (as ``forward``) and the pooled vector, read at each row's first end-of-text token
        (``eos_token_id``) of the last block's output, whatever ``output_layer``.

        transformers configs written before its PR #24773 carry eos_token_id = 2 and pool at argmax(ids)
        instead; CLIP's end token 49407 is the largest id, so for tokenizer output the two agree
        (``text_encoder_config_from_transformers`` maps that case to vocab_size − 1).
        Shapes: (B, L) → hidden (B, L, width), pooled (B, width) or (B, projection_dim).
        """
        states = self._blocks(token_ids, self.config.layers)
        is_eos = token_ids == self.config.eos_token_id
        if not is_eos.any(dim=1).all():
            raise ValueError(f"pooling needs the end token {self.config.eos_token_id} in every row")
        last = self.final_norm(states[-1])
        pooled = last[torch.arange(len(token_ids), device=last.device), is_eos.int().argmax(dim=1)]
        if self.projection is not None:
            pooled = self.projection(pooled)
        hidden = self._hidden(states[self._output_layer(output_layer)])
        return TextEncoderOutput(hidden, pooled)


def clip_skip_layer(config: TextEncoderConfig, clip_skip: int) -> int:
    """The ``output_layer`` for "clip skip" k: k − 1 blocks before the model's own, the final norm as the model has
    it. For SD 1 (last block + norm) that is A1111's CLIP skip (k = 2: the penultimate block, then the final norm);
    for every family it is diffusers' ``clip_skip`` = k − 1 (SDXL: ``hidden_states[-(k + 1)]``, no norm).
    ValueError below 1 or past the first block."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an integer ≥ 1 (1: the model's own text-encoder layer); "
                         f"got {clip_skip!r}")
    most = config.layers + config.output_layer + 1
    if clip_skip > most:
        raise ValueError(f"clip_skip={clip_skip} is beyond the text encoder's {config.layers} blocks (at most {most})")
    return config.output_layer - (clip_skip - 1)


__all__ = ["TextEncoder", "TextEncoderConfig", "TextEncoderOutput", "clip_skip_layer", "quick_gelu"]
