"""Where ``ldm.unet``'s weights live in diffusers folders and in original (CompVis) checkpoints.

ldm keeps the UNet as three flat lists of stages: ``down`` holds num_res_blocks + 1 stages per
level (ResBlock [+ attention] stages, then a Downsample stage, none after the last level),
``up`` holds num_res_blocks + 1 per level (the last one ending in an Upsample, except at level 0).
The original layout numbers the same stages ``input_blocks.{k+1}`` / ``middle_block`` /
``output_blocks.{k}``; diffusers nests them per level (``down_blocks.i.resnets.j``).
"""

from __future__ import annotations

import re
from typing import Literal

from ..unet import UNetConfig
from .core import Layout, Rule

Format = Literal["diffusers", "original"]


def unet_layout(config: UNetConfig, fmt: Format) -> Layout:
    """The naming of ``UNet(config)``'s weights in ``fmt`` ("diffusers": ``UNet2DModel`` /
    ``UNet2DConditionModel``; "original": the ``model.diffusion_model.`` part of a CompVis file, unprefixed)."""
    nrb, levels = config.num_res_blocks, len(config.channel_mult)
    per_level = nrb + 1
    cross = config.context_dim is not None

    def down(m: re.Match) -> str:
        k, slot, conv = int(m[1]), int(m[2]), m[3] or ""
        level, j = divmod(k, per_level)
        if fmt == "original":  # the downsampling conv is called "op" there
            return f"input_blocks.{k + 1}.{slot}.{'op.' if j == nrb else conv}"
        if j == nrb:
            return f"down_blocks.{level}.downsamplers.0.{conv}"
        return f"down_blocks.{level}.{'resnets' if slot == 0 else 'attentions'}.{j}.{conv}"

    def up(m: re.Match) -> str:
        k, slot = int(m[1]), int(m[2])
        if fmt == "original":
            return f"output_blocks.{k}.{slot}."
        i, j = divmod(k, per_level)
        has_attention = config.attention[levels - 1 - i]
        kind = {0: "resnets", 1: "attentions" if has_attention else "upsamplers", 2: "upsamplers"}[slot]
        return f"up_blocks.{i}.{kind}.{0 if kind == 'upsamplers' else j}."

    def mid(m: re.Match) -> str:
        slot = int(m[1])
        if fmt == "original":
            return f"middle_block.{slot}."
        if slot == 1 and config.mid_attention:
            return "mid_block.attentions.0."
        return f"mid_block.resnets.{0 if slot == 0 else 1}."

    resblock = r"^((?:down|up|mid)(?:\.\d+)+)\."  # a direct child of a stage: only ResBlocks have these names
    if fmt == "original":
        inner: list[Rule] = [
            (resblock + "norm1\\.", r"\1.in_layers.0."), (resblock + "conv1\\.", r"\1.in_layers.2."),
            (resblock + "time_emb_proj\\.", r"\1.emb_layers.1."), (resblock + "norm2\\.", r"\1.out_layers.0."),
            (resblock + "conv2\\.", r"\1.out_layers.3."), (resblock + "skip\\.", r"\1.skip_connection."),
        ]
        outer: list[Rule] = [
            (r"^time_embedding\.linear_1\.", "time_embed.0."), (r"^time_embedding\.linear_2\.", "time_embed.2."),
            (r"^conv_in\.", "input_blocks.0.0."), (r"^norm_out\.", "out.0."), (r"^conv_out\.", "out.2."),
            # SDXL's added conditioning: label_emb = Sequential(Sequential(Linear, SiLU, Linear))
            (r"^add_embedding\.linear_1\.", "label_emb.0.0."), (r"^add_embedding\.linear_2\.", "label_emb.0.2."),
            # an LCM-distilled UNet's guidance projection: CompVis code has none, and diffusers' single-file loader
            # maps no such key; ldm writes and reads it beside time_embed's layers under this name
            (r"^time_embedding\.cond_proj\.", "time_embed.cond_proj."),
        ]
    else:
        inner = [(resblock + "skip\\.", r"\1.conv_shortcut.")]
        if not cross:
            inner.append((resblock + r"norm\.", r"\1.group_norm."))  # DDPM self-attention blocks
        outer = [(r"^norm_out\.", "conv_norm_out.")]
    attention: list[Rule] = [(r"\.to_out\.", ".to_out.0."), (r"\.ff\.proj\.", ".ff.net.0.proj."), (r"\.ff\.out\.", ".ff.net.2.")]
    structure: list[Rule] = [(r"^down\.(\d+)\.(\d+)\.(conv\.)?", down), (r"^up\.(\d+)\.(\d+)\.", up), (r"^mid\.(\d+)\.", mid)]
    aliases: list[Rule] = [(r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."),
                           (r"\.proj_attn\.", ".to_out.0.")] if fmt == "diffusers" else []
    return Layout(inner + attention + structure + outer, aliases=aliases)


# diffusers UNet options with more than one setting where ldm's UNet has one way (the first value listed);
# a config that leaves one out gets diffusers' default, which is that way.
FIXED_OPTIONS: dict[str, tuple] = {
    "act_fn": ("silu",), "time_embedding_type": ("positional",), "center_input_sample": (False,),
    "mid_block_scale_factor": (1, 1.0), "downsample_type": ("conv",), "upsample_type": ("conv",),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn"), "time_embedding_dim": (None,),
    "num_class_embeds": (None,), "attn_norm_num_groups": (None,),
}


def check_supported_options(cfg: dict) -> None:
    """Refuse, by name, the diffusers UNet options that would change the computation in a way ldm does not build."""
    for option in ("class_embed_type", "encoder_hid_dim"):
        if cfg.get(option) is not None:
            raise ValueError(f"diffusers UNet option {option}={cfg[option]!r} is not supported yet")
    added = cfg.get("addition_embed_type")
    if added not in (None, "text_time"):  # Kandinsky's image embeddings and relatives
        raise ValueError(f"diffusers UNet option addition_embed_type={added!r} is not supported yet (only 'text_time')")
    for option, allowed in FIXED_OPTIONS.items():  # options that change the computation, where ldm has one way
        if option in cfg and cfg[option] not in allowed:
            raise ValueError(f"diffusers UNet option {option}={cfg[option]!r} is not supported (ldm: {allowed[0]!r})")


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """Read a diffusers ``unet/config.json`` (``UNet2DModel`` or ``UNet2DConditionModel``) into a ``UNetConfig``.

    Added conditionings known: SDXL's addition_embed_type "text_time" (projection_class_embeddings_input_dim is
    ``added_cond_dim``, addition_time_embed_dim ``added_time_dim``) and an LCM-distilled UNet's time_cond_proj_dim."""
    check_supported_options(cfg)
    added = cfg.get("addition_embed_type")
    widths = list(cfg["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    down_types = cfg["down_block_types"]
    known = {"DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"}
    if unknown := set(down_types) - known:
        raise ValueError(f"unsupported diffusers down block types {sorted(unknown)} (supported: {sorted(known)})")
    attention = tuple(t != "DownBlock2D" for t in down_types)
    up_types = cfg.get("up_block_types")
    if up_types is not None and tuple(t != "UpBlock2D" for t in reversed(up_types)) != attention:
        raise ValueError(f"up_block_types {list(up_types)} do not mirror down_block_types {list(down_types)}: "
                         "ldm puts attention at the same levels on the way up as on the way down")
    context_dim = cfg.get("cross_attention_dim") if any(t.startswith("CrossAttn") for t in down_types) else None
    if context_dim is None and cfg.get("resnet_time_scale_shift", "default") != "default" and cfg.get("add_attention", True):
        # UNet2DModel then builds its middle attention without a GroupNorm; ldm's attention block always has one
        raise ValueError(f"a UNet2DModel with resnet_time_scale_shift={cfg['resnet_time_scale_shift']!r} is not supported")
    default_channels = 4 if context_dim is not None else 3  # UNet2DConditionModel's defaults, UNet2DModel's
    if isinstance(context_dim, (list, tuple)):
        raise ValueError(f"per-level cross_attention_dim {context_dim} is not supported")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8
    head_dim = None
    if context_dim is None:  # UNet2DModel: attention_head_dim really is a head dimension (None → one head)
        head_dim, heads = cfg.get("attention_head_dim", 8), 1
    elif isinstance(heads, (list, tuple)):  # SD 2: heads per level, 64 channels each
        dims = {w // h for w, h in zip(widths, heads)}
        if len(dims) != 1:
            raise ValueError(f"attention heads {heads} give different head sizes per level")
        head_dim = dims.pop()
    depth = cfg.get("transformer_layers_per_block", 1)
    return UNetConfig(
        in_channels=cfg.get("in_channels", default_channels), out_channels=cfg.get("out_channels", default_channels),
        sample_size=None, channels=base, channel_mult=tuple(w // base for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 2), attention=attention,
        mid_attention=cfg.get("add_attention", True),
        num_heads=heads if head_dim is None else 1, head_dim=head_dim,
        norm_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
        scale_shift=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
        context_dim=context_dim, transformer_depth=tuple(depth) if isinstance(depth, (list, tuple)) else depth,
        linear_projection=cfg.get("use_linear_projection", False),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=float(cfg.get("freq_shift", 0)),
        asymmetric_downsample=cfg.get("downsample_padding", 1) == 0, time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        added_cond_dim=cfg["projection_class_embeddings_input_dim"] if added else None,
        added_time_dim=cfg["addition_time_embed_dim"] if added else 256,
    )


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """A ``UNetConfig`` with cross-attention as a diffusers ``UNet2DConditionModel`` config (the inverse of the reader)."""
    if config.context_dim is None or config.num_classes is not None or config.scale_shift:
        raise ValueError("only cross-attention UNets without class labels or scale-shift norms are written as diffusers configs")
    widths = [config.channels * m for m in config.channel_mult]
    heads = [w // config.head_dim for w in widths] if config.head_dim else config.num_heads
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": config.sample_size or 64,
        "in_channels": config.in_channels, "out_channels": config.out_channels, "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention)],
        "cross_attention_dim": config.context_dim, "attention_head_dim": heads,
        "transformer_layers_per_block": list(config.transformer_depth) if isinstance(config.transformer_depth, tuple)
        else config.transformer_depth,
        "use_linear_projection": config.linear_projection, "norm_num_groups": config.norm_groups, "norm_eps": config.norm_eps,
        "flip_sin_to_cos": config.flip_sin_to_cos, "freq_shift": int(config.freq_shift),
        "downsample_padding": 0 if config.asymmetric_downsample else 1,
        "addition_embed_type": "text_time" if config.added_cond_dim else None,
        "addition_time_embed_dim": config.added_time_dim if config.added_cond_dim else None,
        "projection_class_embeddings_input_dim": config.added_cond_dim, "time_cond_proj_dim": config.time_cond_proj_dim,
    }
