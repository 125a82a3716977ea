"""Where ``ldm.vae``'s weights live in diffusers folders and in original (CompVis) checkpoints.

ldm: ``encoder.down.{level}.{j}`` (ResBlocks, then the Downsample at j = num_res_blocks),
``decoder.up.{i}.{j}`` with i counting from the lowest resolution (the order they run),
``{encoder,decoder}.mid.{0,1,2}`` = ResBlock, attention, ResBlock.
The original layout indexes ``decoder.up`` by resolution level (reversed) and keeps the mid
attention's projections as 1×1 convolutions.
"""

from __future__ import annotations

import re

from ..vae import VAEConfig
from .core import Layout, Rule
from .unet import Format


def vae_layout(config: VAEConfig, fmt: Format) -> Layout:
    """The naming of ``AutoencoderKL(config)``'s weights in ``fmt`` (original: the ``first_stage_model.`` part, unprefixed)."""
    nrb, levels = config.num_res_blocks, len(config.channel_mult)

    def down(m: re.Match) -> str:
        level, j = int(m[1]), int(m[2])
        if fmt == "original":
            return f"encoder.down.{level}.{'downsample' if j == nrb else f'block.{j}'}."
        return f"encoder.down_blocks.{level}.{'downsamplers.0' if j == nrb else f'resnets.{j}'}."

    def up(m: re.Match) -> str:
        i, j = int(m[1]), int(m[2])
        if fmt == "original":
            return f"decoder.up.{levels - 1 - i}.{'upsample' if j == nrb + 1 else f'block.{j}'}."
        return f"decoder.up_blocks.{i}.{'upsamplers.0' if j == nrb + 1 else f'resnets.{j}'}."

    def mid(m: re.Match) -> str:
        slot = int(m[2]) if config.mid_attention or m[2] == "0" else 2
        if fmt == "original":
            return f"{m[1]}.mid.{['block_1', 'attn_1', 'block_2'][slot]}."
        return f"{m[1]}.mid_block.{['resnets.0', 'attentions.0', 'resnets.1'][slot]}."

    if fmt == "original":
        inner: list[Rule] = [(r"\.skip\.", ".nin_shortcut."), (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."),
                             (r"\.to_v\.", ".v."), (r"\.to_out\.", ".proj_out.")]
        return Layout(inner + [(r"^encoder\.down\.(\d+)\.(\d+)\.", down), (r"^decoder\.up\.(\d+)\.(\d+)\.", up),
                               (r"^(encoder|decoder)\.mid\.(\d)\.", mid)],
                      conv=r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
    inner = [(r"\.skip\.", ".conv_shortcut."), (r"\.mid\.1\.norm\.", ".mid.1.group_norm."), (r"\.to_out\.", ".to_out.0."),
             (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.")]
    aliases: list[Rule] = [(r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."),
                           (r"\.proj_attn\.", ".to_out.0.")]  # diffusers files saved before 0.14
    return Layout(inner + [(r"^encoder\.down\.(\d+)\.(\d+)\.", down), (r"^decoder\.up\.(\d+)\.(\d+)\.", up),
                           (r"^(encoder|decoder)\.mid\.(\d)\.", mid)], aliases=aliases)


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """Read a diffusers ``vae/config.json`` dict into a ``VAEConfig``."""
    widths = list(cfg["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4), channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=cfg.get("layers_per_block", 2),
        mid_attention=cfg.get("mid_block_add_attention", True), norm_groups=cfg.get("norm_num_groups", 32),
        norm_eps=1e-6, scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


def vae_config_to_diffusers(config: VAEConfig) -> dict:
    """A ``VAEConfig`` as a diffusers ``AutoencoderKL`` config (the inverse of ``vae_config_from_diffusers``)."""
    levels = len(config.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": config.in_channels, "out_channels": config.out_channels,
        "latent_channels": config.latent_channels, "block_out_channels": [config.channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks, "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels, "norm_num_groups": config.norm_groups,
        "mid_block_add_attention": config.mid_attention, "scaling_factor": config.scaling_factor, "act_fn": "silu",
    }
