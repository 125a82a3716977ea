"""The denoising UNet: one class, every model size a preset of ``UNetConfig``.

Data flow (levels ℓ = 0 … L−1, resolution halves per level):

    x_t ─conv_in─► [ResBlock (+Attention)] × num_res_blocks ─► Downsample ─► …   (down path, every output saved)
                   mid: ResBlock ─ Attention ─ ResBlock
    … ◄─ Upsample ◄─ [concat(skip) → ResBlock (+Attention)] × (num_res_blocks + 1) (up path, pops the saved outputs)
    ─► GroupNorm ─ SiLU ─ conv_out ─► prediction (ε, x₀ or v)

The timestep (and optional class label, or SDXL's pooled text and size/crop numbers) enters
every ResBlock through one embedding vector  [Ho et al. 2020, App. B; Nichol & Dhariwal 2021; Ronneberger et al. 2015].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttentionBlock, SpatialTransformer
from .blocks import Downsample, ResBlock, TimestepEmbedding, Upsample, cpu_channels_last, timestep_embedding, zero_init
from .gradient_checkpointing import run_stage


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 1
    sample_size: int | None = 28  # None: any size
    channels: int = 64  # base width; level ℓ has channels · channel_mult[ℓ]
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention: tuple[bool, ...] = (False, False, True)  # self-attention at each level
    mid_attention: bool = True
    num_heads: int = 1
    head_dim: int | None = None  # when set, heads = channels / head_dim (overrides num_heads)
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = False  # adaptive GroupNorm in ResBlocks
    num_classes: int | None = None  # class-conditional; label num_classes is the null label for CFG
    context_dim: int | None = None  # cross-attention transformer blocks (SpatialTransformer) instead of self-attention
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per attention layer, or one count per level
    linear_projection: bool = False  # linear proj_in/out in transformer blocks (SD 2, SDXL) instead of 1×1 convs
    label_context: bool = False  # class labels enter as a learned one-token context, not via the time embedding
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    asymmetric_downsample: bool = False
    # SDXL's added conditioning [Podell et al. 2023, §2.2]: pooled text embedding ‖ sinusoidal features of the
    # size/crop numbers, added_cond_dim wide in all (SDXL: 1280 + 6·256 = 2816), enters the time embedding
    added_cond_dim: int | None = None
    added_time_dim: int = 256  # sinusoidal features per size/crop number
    # an LCM-distilled UNet's guidance input [Luo et al. 2023, §4.2]: the w-embedding of the guidance scale
    # (``blocks.guidance_scale_embedding``, this wide) is projected and added to the timestep features
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        if len(self.attention) != len(self.channel_mult):
            raise ValueError(f"attention has {len(self.attention)} entries, channel_mult {len(self.channel_mult)}: need one per level")
        if isinstance(self.transformer_depth, tuple) and len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(f"transformer_depth has {len(self.transformer_depth)} entries, channel_mult {len(self.channel_mult)}")
        if self.label_context and not (self.context_dim and self.num_classes):
            raise ValueError("label_context needs context_dim and num_classes")
        for mult in self.channel_mult:
            if (self.channels * mult) % self.norm_groups:
                raise ValueError(f"width {self.channels * mult} is not divisible by norm_groups={self.norm_groups}")

    def depth(self, level: int) -> int:
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    def with_(self, **changes) -> "UNetConfig":
        return replace(self, **changes)

    @classmethod
    def mnist(cls) -> "UNetConfig":
        """Small model for 28×28 grayscale digits (see README "MNIST recipe" for how it was chosen)."""
        return cls(
            in_channels=1, out_channels=1, sample_size=28, channels=16, channel_mult=(1, 2, 2),
            num_res_blocks=1, attention=(False, False, True), mid_attention=True, head_dim=32,
            norm_groups=8, scale_shift=True,
        )

    @classmethod
    def mnist_latent(cls) -> "UNetConfig":
        """For 2×8×8 MNIST latents; class labels reach it through cross-attention (a one-token context)."""
        return cls(
            in_channels=2, out_channels=2, sample_size=8, channels=64, channel_mult=(1, 2), num_res_blocks=2,
            attention=(False, True), mid_attention=True, head_dim=32, norm_groups=16, scale_shift=True,
            context_dim=64, label_context=True, num_classes=10,
        )

    @classmethod
    def ddpm_cifar10(cls) -> "UNetConfig":
        """The DDPM paper's CIFAR-10 model (35.7M parameters)  [Ho et al. 2020, App. B]."""
        return cls(
            in_channels=3, out_channels=3, sample_size=32, channels=128, channel_mult=(1, 2, 2, 2),
            num_res_blocks=2, attention=(False, True, False, False), mid_attention=True, num_heads=1,
            dropout=0.1, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1.0, asymmetric_downsample=True,
        )

    @classmethod
    def ddpm_256(cls) -> "UNetConfig":
        """The DDPM paper's 256×256 model (113,673,219 parameters, the paper's "114 million"): CelebA-HQ and
        LSUN church, bedroom and cat  [Ho et al. 2020, App. B]. Six levels 256² … 8² of 128·(1, 1, 2, 2, 4, 4)
        channels, one-head self-attention only at 16×16 (level 4) and in the middle, no dropout; the
        embedding and downsampling details are CIFAR-10's."""
        return cls.ddpm_cifar10().with_(sample_size=256, channel_mult=(1, 1, 2, 2, 4, 4),
                                        attention=(False, False, False, False, True, False), dropout=0.0)

    @classmethod
    def sd15(cls, in_channels: int = 4) -> "UNetConfig":
        """Stable Diffusion 1.x (860M parameters): 4-channel 64×64 latents for 512² images, 8 heads,
        cross-attention to 77×768 CLIP ViT-L/14 states  [Rombach et al. 2022, v1-inference.yaml].
        ``in_channels=9`` is the inpainting model (latents, mask, masked-image latents)."""
        return cls(
            in_channels=in_channels, out_channels=4, sample_size=None, channels=320, channel_mult=(1, 2, 4, 4),
            num_res_blocks=2, attention=(True, True, True, False), mid_attention=True, num_heads=8, context_dim=768,
        )

    @classmethod
    def sd2(cls) -> "UNetConfig":
        """Stable Diffusion 2.x: as 1.x but 64-channel heads, linear projections, 1024-wide OpenCLIP context."""
        return cls.sd15().with_(num_heads=1, head_dim=64, context_dim=1024, linear_projection=True)

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        """Stable Diffusion XL base 1.0 (2,567,463,684 parameters)  [Podell et al. 2023, §2.1]: three levels
        (4-channel 128×128 latents for 1024² images), no attention at the highest resolution, 1, 2 and 10
        transformer blocks at the three levels (10 in the middle too; the 1 is unused), 64-channel heads,
        cross-attention to 77×2048 states of two text encoders, and the pooled text embedding plus six
        size/crop numbers added to the time embedding (§2.2)."""
        return cls(
            in_channels=4, out_channels=4, sample_size=None, channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
            attention=(False, True, True), mid_attention=True, num_heads=1, head_dim=64, context_dim=2048,
            transformer_depth=(1, 2, 10), linear_projection=True, added_cond_dim=2816, added_time_dim=256,
        )


class UNetStage(nn.ModuleList):
    """A few layers run in sequence; each gets the inputs it takes (ResBlocks the embedding,
    transformer blocks the context)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, mask)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """Predicts ε (or x₀, or v) from x_t and t; optionally conditioned on a class label or a context sequence.

    Shapes: x (B, in_channels, H, W), t (B,) or scalar, cond: (B,) int64 labels for class-conditional
    models, (B, S, context_dim) for cross-attention models, or None; mask (B, S) bool, True = attend
    → (B, out_channels, H, W). Models with added_cond_dim (SDXL) also take pooled (B, P) and size_ids (B, n)
    (see ``added_embedding``); models with time_cond_proj_dim (LCM-distilled) take timestep_cond
    (B, time_cond_proj_dim), the w-embedding of the guidance scale (``ldm.blocks.guidance_scale_embedding``).
    """

    gradient_checkpointing = False  # recompute each stage in backward (ldm.gradient_checkpointing)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.channels
        self.time_embedding = TimestepEmbedding(c.channels, emb_dim, c.flip_sin_to_cos, c.freq_shift,
                                                cond_dim=c.time_cond_proj_dim)
        self.class_embedding = nn.Embedding(c.num_classes + 1, c.context_dim if c.label_context else emb_dim) \
            if c.num_classes else None
        # only TimestepEmbedding's two layers are used here: added_embedding builds the input features itself
        self.add_embedding = TimestepEmbedding(c.added_cond_dim, emb_dim) if c.added_cond_dim else None
        self.conv_in = nn.Conv2d(c.in_channels, c.channels, 3, padding=1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout=c.dropout, groups=c.norm_groups, eps=c.norm_eps, scale_shift=c.scale_shift)

        def attn(ch: int, level: int) -> nn.Module:
            head_dim = c.head_dim or ch // c.num_heads
            if c.context_dim is None:
                return SelfAttentionBlock(ch, head_dim, groups=c.norm_groups, eps=c.norm_eps)
            return SpatialTransformer(ch, ch // head_dim, head_dim, c.context_dim, depth=c.depth(level),
                                      groups=c.norm_groups, linear_projection=c.linear_projection)

        ch = c.channels
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, c.channels * mult)]
                ch = c.channels * mult
                if c.attention[level]:
                    layers.append(attn(ch, level))
                self.down.append(UNetStage(layers))
                skip_channels.append(ch)
            if level < len(c.channel_mult) - 1:
                self.down.append(UNetStage([Downsample(ch, c.asymmetric_downsample)]))
                skip_channels.append(ch)

        self.mid = UNetStage([res(ch, ch), attn(ch, len(c.channel_mult) - 1), res(ch, ch)] if c.mid_attention else [res(ch, ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), c.channels * mult)]
                ch = c.channels * mult
                if c.attention[level]:
                    layers.append(attn(ch, level))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(UNetStage(layers))

        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=c.norm_eps)
        self.conv_out = zero_init(nn.Conv2d(ch, c.out_channels, 3, padding=1))
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_init(module.conv2)

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"expected x of shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if c.sample_size is not None and (H, W) != (c.sample_size, c.sample_size):
            raise ValueError(f"this UNet was configured for {c.sample_size}×{c.sample_size} inputs, got {H}×{W}")

    def added_embedding(self, pooled: torch.Tensor | None, size_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """SDXL's added conditioning  [Podell et al. 2023, §2.2 "micro-conditioning"]: the pooled text embedding
        and the numbers c = (h_original, w_original, crop_top, crop_left, h_target, w_target), each turned into
        sinusoidal features φ(c_k) = timestep_embedding(c_k, added_time_dim) as a timestep would be,

            e_add = W₂ · SiLU(W₁ · [pooled ‖ φ(c₁) ‖ … ‖ φ(c_n)] + b₁) + b₂
        which ``embed`` adds to the time embedding (diffusers: ``add_time_proj`` and ``add_embedding`` of
        addition_embed_type "text_time"; ``text_embeds`` and ``time_ids`` there).
        Shapes: pooled (B, P), size_ids (B, n), P + n · added_time_dim = added_cond_dim (SDXL: 1280 + 6·256)
        → (B, 4 · channels).
        """
        c = self.config
        missing = [name for name, value in (("pooled", pooled), ("size_ids", size_ids)) if value is None]
        if missing:
            raise ValueError(f"this UNet (added_cond_dim={c.added_cond_dim}) needs pooled (B, P) text embeddings "
                             f"and size_ids (B, n) size/crop numbers (SDXL: P = 1280, n = 6); "
                             f"missing: {', '.join(missing)}")
        for name, value in (("pooled", pooled), ("size_ids", size_ids)):
            if value.dim() != 2 or value.shape[0] != batch:
                raise ValueError(f"{name} must have shape ({batch}, …), one row per sample; got {tuple(value.shape)}")
        width = pooled.shape[1] + size_ids.shape[1] * c.added_time_dim
        if width != c.added_cond_dim:
            raise ValueError(f"pooled {tuple(pooled.shape)} and size_ids {tuple(size_ids.shape)} give "
                             f"{pooled.shape[1]} + {size_ids.shape[1]}·{c.added_time_dim} = {width} features; "
                             f"this UNet takes added_cond_dim = {c.added_cond_dim}")
        mlp = self.add_embedding
        device = mlp.linear_1.weight.device  # size/crop numbers are often built on the CPU
        sizes = timestep_embedding(size_ids.to(device).flatten(), c.added_time_dim, c.flip_sin_to_cos, c.freq_shift)
        features = torch.cat([pooled.to(device).float(), sizes.reshape(batch, -1)], dim=1)  # [pooled ‖ φ(c₁) ‖ …]
        return mlp.linear_2(F.silu(mlp.linear_1(features.to(mlp.linear_1.weight.dtype))))

    def embed(self, t: torch.Tensor, cond: torch.Tensor | None, batch: int, device: torch.device,
              pooled: torch.Tensor | None = None, size_ids: torch.Tensor | None = None,
              timestep_cond: torch.Tensor | None = None):
        """The per-sample embedding added in every ResBlock, and the context for cross-attention (or None)."""
        c = self.config
        t = torch.as_tensor(t, device=device)
        t = t.expand(batch) if t.dim() == 0 else t
        self.check_timestep_cond(timestep_cond, batch)
        emb = self.time_embedding(t, None if timestep_cond is None else timestep_cond.to(device))
        if self.add_embedding is not None:
            emb = emb + self.added_embedding(pooled, size_ids, batch)
        elif pooled is not None or size_ids is not None:
            raise ValueError("this UNet takes no added conditioning (added_cond_dim=None), "
                             "but pooled or size_ids was passed")
        context = None
        if self.class_embedding is not None:
            n = c.num_classes
            labels = torch.full((batch,), n, device=device) if cond is None else cond.to(device)
            if labels.dtype.is_floating_point or labels.shape != (batch,):
                raise ValueError(f"cond must be int64 class labels of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")
            if labels.min() < 0 or labels.max() > n:
                raise ValueError(f"class label out of range [0, {n}] ({n} = null label): got {labels.tolist()}")
            if c.label_context:
                context = self.class_embedding(labels)[:, None, :]  # (B, 1, context_dim)
            else:
                emb = emb + self.class_embedding(labels)
        elif c.context_dim is not None:
            if cond is None or cond.dim() != 3 or cond.shape[0] != batch or cond.shape[2] != c.context_dim:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"this UNet cross-attends to a context of shape ({batch}, S, {c.context_dim}); got {got}")
            context = cond
        elif cond is not None:
            raise ValueError("this UNet is unconditional (num_classes=None, context_dim=None) but a cond was passed")
        return emb, context

    def check_timestep_cond(self, timestep_cond: torch.Tensor | None, batch: int) -> None:
        """An LCM-distilled UNet (time_cond_proj_dim set) needs the w-embedding, one row per sample; any other UNet
        has no input for it."""
        dim = self.config.time_cond_proj_dim
        if dim is None:
            if timestep_cond is not None:
                raise ValueError("this UNet takes no timestep_cond (time_cond_proj_dim=None: not an LCM-distilled "
                                 "UNet), but one was passed")
            return
        if timestep_cond is None or timestep_cond.shape != (batch, dim):
            got = None if timestep_cond is None else tuple(timestep_cond.shape)
            raise ValueError(f"this LCM-distilled UNet (time_cond_proj_dim={dim}) needs timestep_cond of shape "
                             f"({batch}, {dim}), the guidance scale's w-embedding "
                             f"(ldm.blocks.guidance_scale_embedding(w, {dim})); got {got}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, *, pooled: torch.Tensor | None = None,
                size_ids: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        emb, context = self.embed(t, cond, x.shape[0], x.device, pooled, size_ids, timestep_cond)
        h = self.conv_in(cpu_channels_last(x))
        skips = [h]
        for stage in self.down:
            h = run_stage(self, stage, h, emb, context, mask)
            skips.append(h)
        h = run_stage(self, self.mid, h, emb, context, mask)
        for stage in self.up:
            # an odd size rounds up when halved; upsampling then goes back to the skip's exact size
            h = torch.cat([h, skips.pop()], dim=1)
            h = run_stage(self, stage, h, emb, context, mask, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()
