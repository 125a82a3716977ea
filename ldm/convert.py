"""Translating other libraries' weight names into ldm's, by short rule tables.

A rule is ``(regex, replacement)`` applied with ``re.sub`` in order; a replacement may be a
function of the match (for index arithmetic).
After renaming, 1×1 convolutions and linear layers are reshaped into each other where the
target model wants the other one, and ``load_weights`` checks that every key was consumed and
every shape matches, naming whatever does not.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, Union

import torch
from torch import nn

from .checkpoint import load_weights
from .unet import UNetConfig
from .vae import VAEConfig

Replacement = Union[str, Callable[[re.Match], str]]
Rule = tuple[str, Replacement]


def rename(key: str, rules: Sequence[Rule]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def convert_state_dict(state_dict: dict[str, torch.Tensor], rules: Sequence[Rule], model: nn.Module,
                       ignore: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Rename every key by ``rules`` and reshape 1×1 conv ↔ linear weights to the model's shapes.

    Keys matching a regex in ``ignore`` (e.g. buffers like ``position_ids``) are dropped.
    """
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in ignore):
            continue
        new = rename(key, rules)
        if new in out:
            raise ValueError(f"two source keys map to {new!r} (the second is {key!r}): a rule table is wrong")
        want = target.get(new)
        if want is not None and want.shape != value.shape and want.numel() == value.numel() and value.dim() + want.dim() in (4, 6):
            value = value.reshape(want.shape)  # [C, C, 1, 1] conv ↔ [C, C] linear
        out[new] = value
    return out


def load_converted(model: nn.Module, state_dict: dict[str, torch.Tensor], rules: Sequence[Rule], source: str,
                   ignore: Sequence[str] = ()) -> nn.Module:
    load_weights(model, convert_state_dict(state_dict, rules, model, ignore), source=source)
    return model


def _resnet_and_attention_rules() -> list[Rule]:
    """Names inside a ResBlock / attention block, shared by the VAE and UNet tables."""
    return [
        (r"\.conv_shortcut\.", ".skip."),
        (r"\.group_norm\.", ".norm."),
        (r"\.to_out\.0\.", ".to_out."),
        (r"\.query\.", ".to_q."),  # diffusers files saved before 0.14
        (r"\.key\.", ".to_k."),
        (r"\.value\.", ".to_v."),
        (r"\.proj_attn\.", ".to_out."),
    ]


def vae_rules(config: VAEConfig) -> list[Rule]:
    """Rules from diffusers' ``AutoencoderKL`` names to ``ldm.vae``'s."""
    n = config.num_res_blocks
    mid_last = "2" if config.mid_attention else "1"
    rules: list[Rule] = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", rf"encoder.down.\1.{n}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", rf"decoder.up.\1.{n + 1}."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.\2."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.\1.\2."),
        (r"\.mid_block\.resnets\.0\.", ".mid.0."),
        (r"\.mid_block\.attentions\.0\.", ".mid.1."),
        (r"\.mid_block\.resnets\.1\.", f".mid.{mid_last}."),
    ]
    return rules + _resnet_and_attention_rules()


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """Read a diffusers ``vae/config.json`` dict into a ``VAEConfig``."""
    mults = [ch // cfg["block_out_channels"][0] for ch in cfg["block_out_channels"]]
    if any(mult * cfg["block_out_channels"][0] != ch for mult, ch in zip(mults, cfg["block_out_channels"])):
        raise ValueError(f"block_out_channels {cfg['block_out_channels']} are not multiples of the first")
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4), channels=cfg["block_out_channels"][0],
        channel_mult=tuple(mults), num_res_blocks=cfg.get("layers_per_block", 2),
        mid_attention=cfg.get("mid_block_add_attention", True), norm_groups=cfg.get("norm_num_groups", 32),
        norm_eps=1e-6, scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


def unet2d_rules(config: UNetConfig) -> list[Rule]:
    """Rules from diffusers' ``UNet2DModel`` (the original DDPM models' layout) to ``ldm.unet``.

    diffusers nests stages per level (``down_blocks.i.resnets.j``); ldm keeps one flat list
    with nrb + 1 stages per level (nrb ResBlock stages, then a Downsample stage, or on the way up
    nrb + 1 ResBlock stages, the last ending in the Upsample), so indices are recomputed.
    """
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)

    def up_sample_slot(m: re.Match) -> str:
        level = levels - 1 - int(m[1])
        return f"up.{int(m[1]) * per_level + config.num_res_blocks}.{2 if config.attention[level] else 1}."

    return [
        (r"^conv_norm_out\.", "norm_out."),
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"down.{int(m[1]) * per_level + int(m[2])}.0."),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"down.{int(m[1]) * per_level + int(m[2])}.1."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{int(m[1]) * per_level + config.num_res_blocks}.0."),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{int(m[1]) * per_level + int(m[2])}.0."),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"up.{int(m[1]) * per_level + int(m[2])}.1."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", up_sample_slot),
        (r"^mid_block\.resnets\.0\.", "mid.0."),
        (r"^mid_block\.attentions\.0\.", "mid.1."),
        (r"^mid_block\.resnets\.1\.", "mid.2." if config.mid_attention else "mid.1."),
    ] + _resnet_and_attention_rules()
