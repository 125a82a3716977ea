"""Weights in other libraries' layouts: rule tables from ldm's names to theirs, and back."""

from .clip import (from_openclip, fuse_qkv, split_fused_qkv, text_encoder_config_from_transformers,
                   text_encoder_config_to_transformers, text_encoder_layout, to_openclip)
from .core import Layout, Rule, export_state_dict, foreign_names, import_state_dict, rename
from .scheduler import sampling_from_diffusers, sampling_to_diffusers
from .taesd import check_latent_space, load_taesd, taesd_layout
from .unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_layout
from .vae import vae_config_from_diffusers, vae_config_to_diffusers, vae_layout

__all__ = [
    "from_openclip", "fuse_qkv", "split_fused_qkv", "text_encoder_config_from_transformers",
    "text_encoder_config_to_transformers", "text_encoder_layout", "to_openclip",
    "Layout", "Rule", "sampling_from_diffusers", "sampling_to_diffusers", "export_state_dict", "foreign_names",
    "import_state_dict", "rename", "check_latent_space", "load_taesd", "taesd_layout",
    "unet_config_from_diffusers", "unet_config_to_diffusers", "unet_layout", "vae_config_from_diffusers",
    "vae_config_to_diffusers", "vae_layout",
]
