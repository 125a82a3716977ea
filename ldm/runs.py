"""Run directories, read for inference: what `ldm train` and `ldm train-vae` leave behind.

A run directory is ``config.json`` (the whole training config) + ``checkpoint.pt`` (model and EMA weights,
optimizer, step, RNG states). Sampling needs only part of that — the model's config, its weights and how
it was trained to be sampled — and reads it here without loading any training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_weights, read_json, safe_load
from .config import from_dict
from .sampling import SamplingConfig
from .schedule import ScheduleConfig
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"


def read_run(path: str | Path, kind: str, command: str) -> tuple[dict, dict[str, Any]]:
    """Read a run directory (``checkpoint.pt`` + ``config.json``) or a checkpoint file: (state, config as a dict).

    The config is the checkpoint's own, the one its weights were trained with; ``config.json`` beside it is a copy
    for people to read, and one that disagrees with it (edited, or copied from another run) is an error.
    ``kind`` is a config field only this kind of run has ("unet", "kl_weight"); a run of another kind gets an
    error that says which command makes the right one.
    """
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    state = safe_load(file)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{file} is not an ldm training checkpoint (no 'config' entry)")
    config = state["config"]
    if kind not in config:
        raise CheckpointError(f"{file} is not a run of `{command}` (its config has no {kind!r})")
    json_file = file.parent / CONFIG
    if json_file.is_file():
        differences = _differences(read_json(json_file), config)
        if differences:
            shown = "; ".join(differences[:4]) + (f"; … ({len(differences)} in all)" if len(differences) > 4 else "")
            raise CheckpointError(f"{json_file} disagrees with {file} ({shown}); the checkpoint holds the config its "
                                  f"weights were trained with: delete {json_file.name} or restore it from that run")
    return state, config


def _differences(json_config: Any, config: Any, prefix: str = "") -> list[str]:
    """Where two configs (nested dicts) differ, as "field: X in config.json, Y in the checkpoint"."""
    if isinstance(json_config, dict) and isinstance(config, dict):
        keys = [*config, *(key for key in json_config if key not in config)]  # the config's own order: model first
        return [line for key in keys
                for line in _differences(json_config.get(key, "(absent)"), config.get(key, "(absent)"), f"{prefix}{key}.")]
    if json_config == config:
        return []
    return [f"{prefix.rstrip('.')}: {json.dumps(json_config)} in {CONFIG}, {json.dumps(config)} in the checkpoint"]


def load_diffusion_run(path: str | Path, *, ema: bool = True) -> tuple[UNet, SamplingConfig, str | None, VAEConfig | None]:
    """An `ldm train` run: (UNet in eval mode, its sampling settings, the path of the VAE run a latent model was
    trained on or None, that VAE's recorded config). Its sampling steps are spaced "leading", as in training."""
    state, config = read_run(path, "unet", "ldm train")
    unet = UNet(from_dict(UNetConfig, config["unet"]))
    load_weights(unet, state["ema"]["model"] if ema else state["model"], source=f"{path} ({'EMA' if ema else 'raw'} weights)")
    sampling = SamplingConfig(schedule=from_dict(ScheduleConfig, config.get("schedule", {})),
                              prediction=config.get("prediction", "eps"), clip_x0=config.get("clip_sample", True))
    vae_config = config.get("vae_config")
    return unet.eval(), sampling, config.get("vae"), None if vae_config is None else from_dict(VAEConfig, vae_config)


def load_vae(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[AutoencoderKL, int]:
    """An `ldm train-vae` run (directory or checkpoint file): (VAE in eval mode, image size it was trained at)."""
    state, config = read_run(path, "kl_weight", "ldm train-vae")
    vae = AutoencoderKL(from_dict(VAEConfig, config["vae"]))
    load_weights(vae, state["ema"]["model"] if ema else state["model"], source=f"{path} (VAE)")
    return vae.to(device).eval().requires_grad_(False), config.get("image_size", 32)


def check_vae_matches(expected: VAEConfig | None, vae: AutoencoderKL, source: str) -> None:
    """A latent UNet only makes sense with the VAE whose latents it learned: same shape and same scale."""
    if expected is None:
        return
    got = vae.config
    for name in ("latent_channels", "downsample_factor", "scaling_factor"):
        if getattr(got, name) != getattr(expected, name):
            raise ValueError(f"{source}: the latent model was trained with a VAE of {name} {getattr(expected, name)}, "
                             f"this VAE has {getattr(got, name)}")
