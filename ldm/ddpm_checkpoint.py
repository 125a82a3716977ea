"""Diffusers DDPM/DDIM folders, e.g. the original DDPM models ``google/ddpm-cifar10-32``, ``-celebahq-256``,
``-church-256``, ``-bedroom-256``, ``-cat-256``  [Ho et al. 2020] (presets ``UNetConfig.ddpm_cifar10`` and
``ddpm_256``), read into a UNet and the scheduler settings it was saved with.

Layouts: ``model_index.json`` naming a DDPMPipeline or DDIMPipeline, with ``unet/`` and ``scheduler/``;
``unet/`` (and ``scheduler/``) without the index; or a bare ``UNet2DModel`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors`` or ``.bin``, ``scheduler_config.json`` beside them or none:
``DDPMScheduler``'s defaults). Weights are checked key by key and shape by shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import WEIGHT_STEMS, load_state_dict_file, read_json, weight_file
from .convert import import_state_dict, sampling_from_diffusers, unet_config_from_diffusers, unet_layout
from .sampling import SamplingConfig
from .unet import UNet, UNetConfig


def unet_config(cfg: dict[str, Any]) -> UNetConfig:
    """A diffusers ``UNet2DModel`` config → ``UNetConfig`` with its (square) ``sample_size``."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"the UNet is a {cfg['_class_name']}; an unconditional pipeline needs a UNet2DModel "
                         "(Stable Diffusion folders: `ldm txt2img`)")
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square sample_size {list(size)} is not supported")
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"the UNet config gives no sample_size (got {size!r}): the image size is unknown")
    return unet_config_from_diffusers(cfg).with_(sample_size=size)


def diffusers_parts(folder: Path) -> tuple[Path, Path | None]:
    """Where a DDPM/DDIM folder keeps its UNet (a folder: config + weights) and its scheduler config (or None)."""
    unet_dir = folder / "unet" if (folder / "model_index.json").is_file() or (folder / "unet").is_dir() else folder
    scheduler = folder / "scheduler" / "scheduler_config.json" if unet_dir != folder else folder / "scheduler_config.json"
    return unet_dir, scheduler if scheduler.is_file() else None


def load_ddpm_folder(folder: str | Path) -> tuple[UNet, SamplingConfig]:
    """(UNet in float32 and eval mode, the sampling settings of its scheduler config)."""
    unet_dir, scheduler_file = diffusers_parts(Path(folder))
    config = unet_config(read_json(unet_dir / "config.json"))
    sampling = sampling_from_diffusers(read_json(scheduler_file) if scheduler_file else {})
    weights = weight_file(unet_dir, WEIGHT_STEMS["unet"], what="UNet")
    with torch.device("meta"):  # never initialised: the file's tensors are adopted
        unet = UNet(config)
    import_state_dict(unet, load_state_dict_file(weights), unet_layout(config, "diffusers"), str(weights), assign=True)
    return unet.float().eval(), sampling
