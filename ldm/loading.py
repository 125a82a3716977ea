"""One entry for every model on disk: ``load_pipeline(path)`` recognises what ``path`` holds and returns the pipeline.

    ldm train run (folder with checkpoint.pt, or the .pt file)   ─ runs.py ─────────────┐
    diffusers DDPMPipeline / DDIMPipeline / UNet2DModel folder   ─ ddpm_checkpoint.py ──┼─► DiffusionPipeline
    Stable Diffusion single file (.safetensors / .ckpt)          ─ sd_checkpoint.py ───┐│
    diffusers StableDiffusion(XL)Pipeline folder                 ─ sd_checkpoint.py ───┴┴─► StableDiffusion

The readers return components; only this module puts them together as pipelines.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, read_json
from .ddpm_checkpoint import load_ddpm_folder
from .pipeline import DiffusionPipeline
from .runs import CHECKPOINT, check_vae_matches, load_diffusion_run, load_vae
from .sampling import Pipeline, default_device
from .sd_checkpoint import load_diffusers_folder, load_single_file
from .sd_config import StableDiffusionConfig, check_preset
from .stable_diffusion import StableDiffusion

# diffusers pipeline classes → what reads them
PIPELINE_CLASSES = {"DDPMPipeline": "ddpm-folder", "DDIMPipeline": "ddpm-folder",
                    "StableDiffusionPipeline": "sd-folder", "StableDiffusionImg2ImgPipeline": "sd-folder",
                    "StableDiffusionInpaintPipeline": "sd-folder", "StableDiffusionXLPipeline": "sd-folder",
                    "StableDiffusionXLImg2ImgPipeline": "sd-folder",  # the SDXL refiner's
                    "LatentConsistencyModelPipeline": "sd-folder", "LatentConsistencyModelImg2ImgPipeline": "sd-folder"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# each kind of checkpoint: what it is called, and the options it understands beside device and dtype
KINDS = {"run": ("an `ldm train` run", {"ema", "vae"}), "ddpm-folder": ("a diffusers DDPM/DDIM folder", set()),
         "sd-folder": ("a diffusers Stable Diffusion folder", {"variant", "prediction", "preset"}),
         "sd-file": ("a Stable Diffusion single file", {"ema", "config", "prediction", "preset"})}


def finetuned_model(path: str | Path) -> Path:
    """The model a full fine-tuning run wrote (``ldm finetune --method full``, ``ldm train --preset mnist-text``):
    RUN/model (a folder or an `ldm train` run) or RUN/model.safetensors; any other path as it is. A run is told by
    its ``config.json`` (a ``FinetuneConfig`` with method "full"), not by the names alone: an ``ldm train`` run
    directory may hold a file called model.safetensors too."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        try:
            config = read_json(path / "config.json")
        except CheckpointError:
            return path  # not a run ldm wrote: the loaders name what is wrong with it
        if not (isinstance(config, dict) and config.get("method") == "full"):
            return path
        for product in (path / "model", path / "model.safetensors"):
            if product.exists():
                return product
    return path


def checkpoint_kind(path: str | Path) -> str:
    """"run", "ddpm-folder", "sd-folder" or "sd-file", from the files alone (nothing is loaded); a fine-tuning
    run's directory is the kind of the model it wrote (``finetuned_model``)."""
    path = finetuned_model(path)
    if path.is_file():
        return "sd-file" if path.suffix in SINGLE_FILE_SUFFIXES else "run"
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (expected an `ldm train` run directory or checkpoint.pt, a "
                              "Stable Diffusion .safetensors/.ckpt file, or a diffusers folder)")
    if (path / CHECKPOINT).exists():
        return "run"
    if (path / "model_index.json").is_file():
        name = read_json(path / "model_index.json").get("_class_name")
        if name not in PIPELINE_CLASSES:
            raise CheckpointError(f"{path} holds a diffusers {name}; supported: {', '.join(PIPELINE_CLASSES)}")
        return PIPELINE_CLASSES[name]
    if (path / "unet").is_dir() or (path / "config.json").is_file():  # unet/ without an index, or a bare UNet2DModel
        return "ddpm-folder"
    raise CheckpointError(f"{path} holds neither an `ldm train` run ({CHECKPOINT}) nor a diffusers folder "
                          "(model_index.json, unet/, or a model's config.json)")


def load_pipeline(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  ema: bool = True, vae: str | Path | None = None, variant: str | None = None,
                  config: StableDiffusionConfig | None = None, prediction: str | None = None,
                  preset: str | None = None) -> Pipeline:
    """Load any model ldm reads, ready to sample: a ``DiffusionPipeline`` or a ``StableDiffusion``. A full
    fine-tuning run's directory (``ldm train --preset mnist-text`` too) loads the model it wrote.

    ``device`` (default: CUDA when there is one) and ``dtype`` (default float32) place the weights (a Stable
    Diffusion VAE stays float32 under float16). The rest apply where they mean something, and are refused
    elsewhere: ``ema`` (runs and single files: the EMA weights, which sample better; False for the raw ones),
    ``vae`` (a latent run: another `ldm train-vae` run with the same latent shape and scale), ``variant``
    (diffusers folders: e.g. "fp16"), ``config`` (single files: skip family detection), ``prediction`` ("eps"
    or "v": override what the checkpoint says or implies; ``pipe.notes`` tells which), ``preset`` (Stable
    Diffusion: "sd-turbo" or "sdxl-turbo", a distilled model whose weights look like SD 2.1's or SDXL's, sampled by
    default as it was trained — its scheduler settings, 1 step, no guidance; detected without it from a name with
    "turbo" in it or, for a folder, the scheduler it ships; "none" turns that off; ``pipe.notes`` tells which).
    """
    kind = checkpoint_kind(path)
    given = {name for name, value in dict(ema=not ema, vae=vae, variant=variant, config=config,
                                          prediction=prediction, preset=preset).items() if value}
    what, takes = KINDS[kind]
    if given - takes:
        refused = ", ".join("ema=False (raw weights)" if name == "ema" else name for name in sorted(given - takes))
        raise ValueError(f"{path} is {what}: {refused} does not apply to it "
                         f"(it takes {', '.join(sorted(takes)) or 'no options'})")
    check_preset(preset)
    device, path = device or default_device(), finetuned_model(path)
    if kind == "run":
        pipe = _load_run(path, ema, vae, device)
    elif kind == "ddpm-folder":
        pipe = DiffusionPipeline(*load_ddpm_folder(path))
    elif kind == "sd-folder":
        pipe = StableDiffusion(**load_diffusers_folder(path, variant=variant, prediction=prediction, preset=preset))
    else:
        pipe = StableDiffusion(**load_single_file(path, config=config, ema=ema, prediction=prediction, preset=preset))
    return pipe.to(device=device, dtype=dtype or torch.float32)


def _load_run(path: str | Path, ema: bool, vae: str | Path | None, device: str | torch.device) -> DiffusionPipeline:
    """An `ldm train` run; a latent model loads the VAE it was trained with (or ``vae``, checked to match)."""
    unet, sampling, trained_vae, vae_config = load_diffusion_run(path, ema=ema)
    autoencoder = None
    if vae is not None or trained_vae is not None:
        source = vae if vae is not None else trained_vae
        autoencoder, _ = load_vae(source, device=device)
        check_vae_matches(vae_config, autoencoder, str(source))
    return DiffusionPipeline(unet, sampling, autoencoder)
