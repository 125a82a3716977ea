"""Stable Diffusion weights on disk: recognise, read and write single files and diffusers folders.

    single file (.safetensors / .ckpt)            diffusers folder
      model.diffusion_model.*   ─┐                  unet/            config.json + weights
      first_stage_model.*        ├─ rule tables ─►  vae/             config.json + weights
      cond_stage_model.*        ─┤  (convert/)      text_encoder/    config.json + weights
      conditioner.embedders.{0,1}.* (SDXL)          text_encoder_2/  (SDXL; the refiner's only encoder)
      model_ema.* (optional EMA UNet)               tokenizer/ (tokenizer_2/), scheduler/, model_index.json

Both are read into the same components — config, tokenizers, text encoders, UNet, VAE, notes — that
``ldm.load_pipeline`` puts together as a ``StableDiffusion``; this module never needs the pipeline class.
Models are built on the "meta" device and adopt the file's tensors, so nothing is initialised only to be
overwritten. Pickled files go through ``checkpoint.load_state_dict_file``, which never runs code.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .checkpoint import (WEIGHT_STEMS, CheckpointError, atomic_save_safetensors, load_state_dict_file, load_weight_file, read_json,
                         weight_file)
from .convert import (Layout, export_state_dict, foreign_names, from_openclip, import_state_dict, sampling_from_diffusers,
                      sampling_to_diffusers, text_encoder_config_from_transformers, text_encoder_config_to_transformers,
                      text_encoder_layout, to_openclip, unet_config_from_diffusers, unet_config_to_diffusers, unet_layout,
                      vae_config_from_diffusers, vae_config_to_diffusers, vae_layout)
from .sd_config import SHIPPED_SAMPLERS, StableDiffusionConfig, choose_preset
from .text_encoder import TextEncoder
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2: OpenCLIP's own names, q/k/v fused
SDXL_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")  # CLIP ViT-L, OpenCLIP bigG
REFINER_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner's one encoder, OpenCLIP bigG, comes first
# Single-file entries that are not weights of any model: the training schedule's buffers, EMA bookkeeping.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                    "model_ema.decay", "model_ema.num_updates", "logvar")


class UnsupportedCheckpoint(CheckpointError):
    """A readable checkpoint of a model family ldm does not load (yet)."""


# --- single files -------------------------------------------------------------------------------
def detect_config(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> StableDiffusionConfig:
    """The model family, from the keys and shapes of an original-layout state dict (``detect_family``), and an
    LCM-distilled UNet by its guidance projection ``time_embed.cond_proj.weight`` (C, time_cond_proj_dim)."""
    config = detect_family(state_dict, source)
    cond_proj = state_dict.get(UNET_PREFIX + "time_embed.cond_proj.weight")
    if cond_proj is None:
        return config
    return lcm_defaults(config.with_(unet=config.unet.with_(time_cond_proj_dim=cond_proj.shape[1])))


def lcm_defaults(config: StableDiffusionConfig) -> StableDiffusionConfig:
    """An LCM-distilled UNet (``time_cond_proj_dim``) is sampled by default as diffusers' LatentConsistencyModelPipeline
    samples it: 4 steps of the ``lcm`` sampler at guidance 8.5 (the w-embedding's; no classifier-free guidance)."""
    if config.unet.time_cond_proj_dim is None or config.distilled is not None:
        return config
    return config.with_(distilled="lcm", default_sampler="lcm", default_steps=4, default_guidance=8.5)


def detect_family(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> StableDiffusionConfig:
    """The model family, from the keys and shapes of an original-layout state dict.

    SD 2's prediction type (ε or v) is not in the weights: this returns v, as diffusers assumes;
    ``choose_prediction`` refines it from the file's metadata."""
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        found = sorted({".".join(k.split(".")[:4]) + "." for k in state_dict if k.startswith("conditioner.")})
        if set(SDXL_PREFIXES) <= set(found):
            return StableDiffusionConfig.sdxl()
        if found == [REFINER_PREFIX]:
            return StableDiffusionConfig.sdxl_refiner()
        raise UnsupportedCheckpoint(f"{source}: an SDXL-style checkpoint with text encoders {', '.join(found)}; known: "
                                    f"SDXL base ({' and '.join(SDXL_PREFIXES)}), SDXL refiner ({REFINER_PREFIX})")
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        prefixes = sorted({k.split(".")[0] for k in state_dict})
        raise UnsupportedCheckpoint(f"{source} is not a Stable Diffusion checkpoint: no {UNET_PREFIX}input_blocks.0.0.weight; "
                                    f"top-level names found: {', '.join(prefixes[:12])}; "
                                    "known families: SD 1.x, SD 2.x, SDXL base and refiner")
    to_k = state_dict.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    context = None if to_k is None else to_k.shape[1]
    channels = conv_in.shape[1]
    if channels not in (4, 9):
        raise UnsupportedCheckpoint(f"{source}: UNet with {channels} input channels (known: 4, and 9 for inpainting)")
    if context == 768:
        return StableDiffusionConfig.sd15() if channels == 4 else StableDiffusionConfig.sd15_inpainting()
    if context == 1024:
        return StableDiffusionConfig.sd2(in_channels=channels)
    raise UnsupportedCheckpoint(f"{source}: unknown UNet (cross-attention context width {context}; "
                                "768 is SD 1.x, 1024 is SD 2.x)")


def choose_prediction(config: StableDiffusionConfig, state: dict[str, torch.Tensor], metadata: dict[str, Any],
                      override: str | None) -> tuple[str, str]:
    """(prediction, why): the user's choice, else what the file says, else the family's default."""
    if override is not None:
        return override, "set by the caller"
    if not config.family.startswith("sd2"):
        return config.prediction, f"{config.family} models predict ε"
    if "v_pred" in state:  # a marker tensor some training tools add
        return "v", "the file's v_pred marker"
    declared = str(metadata.get("modelspec.prediction_type", "")).lower()
    if declared in ("v", "v_prediction", "epsilon", "eps"):
        return ("v" if declared.startswith("v") else "eps"), f"the file's modelspec.prediction_type={declared!r}"
    if metadata.get("global_step") == 875000:
        return "eps", "global_step 875000, the 2-base release"
    if config.distilled:  # a preset (choose_preset) says which model this is: SD-Turbo predicts ε
        return config.prediction, f"the {config.distilled} preset"
    if config.inpainting:
        return "eps", "the SD 2 inpainting model predicts ε"
    return "v", "SD 2 default (the 768 models); pass prediction='eps' (--prediction eps) for 2-base"


def single_file_layouts(config: StableDiffusionConfig) -> dict[str, Layout]:
    """Each component's layout in an original single file, prefix included."""
    layouts = {"unet": unet_layout(config.unet, "original").with_prefix(UNET_PREFIX),
               "vae": vae_layout(config.vae, "original").with_prefix(VAE_PREFIX)}
    if config.text is None:
        layouts["text_encoder_2"] = text_encoder_layout(config.text_2, "openclip").with_prefix(REFINER_PREFIX)
    elif config.text_2 is not None:
        layouts["text_encoder"] = text_encoder_layout(config.text, "transformers").with_prefix(SDXL_PREFIXES[0])
        layouts["text_encoder_2"] = text_encoder_layout(config.text_2, "openclip").with_prefix(SDXL_PREFIXES[1])
    elif config.family.startswith("sd2"):
        layouts["text_encoder"] = text_encoder_layout(config.text, "openclip").with_prefix(OPENCLIP_PREFIX)
    else:
        layouts["text_encoder"] = text_encoder_layout(config.text, "transformers").with_prefix(TEXT_PREFIX)
    return layouts


def ema_key(name: str) -> str:
    """Where the EMA copy of a UNet weight lives: ``model.diffusion_model.a.0.b`` → ``model_ema.diffusion_modela0b``."""
    return "model_ema." + "".join(name.split(".")[1:])


def with_ema_weights(state_dict: dict[str, torch.Tensor], unet: UNet, layout: Layout, source: str) -> dict[str, torch.Tensor]:
    """The state dict with the UNet's weights replaced by their EMA copies (``model_ema.*``)."""
    out = dict(state_dict)
    missing = []
    for name in foreign_names(unet, layout).values():
        if ema_key(name) in state_dict:
            out[name] = state_dict[ema_key(name)]
        else:
            missing.append(ema_key(name))
    if missing:
        raise CheckpointError(f"{source} has EMA weights but not for every UNet weight (e.g. {missing[0]}); pass ema=False")
    return out


def has_ema(state_dict: dict[str, torch.Tensor]) -> bool:
    return sum(k.startswith("model_ema.") for k in state_dict) > 100  # a couple of bookkeeping entries do not count


def build_models(config: StableDiffusionConfig) -> dict[str, torch.nn.Module]:
    """The pipeline's models, on the meta device (no memory, no initialisation) until weights are assigned."""
    with torch.device("meta"):
        models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae)}
        if config.text is not None:
            models["text_encoder"] = TextEncoder(config.text)
        if config.text_2 is not None:
            models["text_encoder_2"] = TextEncoder(config.text_2)
    return models


def components(config: StableDiffusionConfig, models: dict[str, torch.nn.Module],
               tokenizers: tuple[CLIPTokenizer | None, CLIPTokenizer | None], notes: list[str]) -> dict[str, Any]:
    """What a loader read, as the keyword arguments of ``StableDiffusion``; ``tokenizers`` are the two encoders'
    (None where there is no such encoder)."""
    return dict(tokenizer=tokenizers[0], text_encoder=models.get("text_encoder"), tokenizer_2=tokenizers[1],
                text_encoder_2=models.get("text_encoder_2"), unet=models["unet"], vae=models["vae"], config=config,
                notes=notes)


def bundled_tokenizers(config: StableDiffusionConfig) -> tuple[CLIPTokenizer | None, CLIPTokenizer | None]:
    """Single files carry no tokenizer: CLIP's vocabulary is bundled; SDXL's second encoder pads with zeros."""
    return (CLIPTokenizer.from_bundled(pad=config.pad) if config.text else None,
            CLIPTokenizer.from_bundled(pad="zero") if config.text_2 else None)


def pipeline_models(pipe) -> dict[str, torch.nn.Module]:
    """A pipeline's (or a loader's components') models by component name."""
    return {name: model for name in WEIGHT_STEMS if (model := getattr(pipe, name, None)) is not None}


def load_single_file(path: str | Path, *, config: StableDiffusionConfig | None = None, ema: bool = True,
                     prediction: str | None = None, preset: str | None = None) -> dict[str, Any]:
    """An original-layout file: detect the family (unless ``config`` says), translate and load every component.

    ``ema`` takes the EMA UNet weights when the file has them (they sample better); ``prediction``
    overrides the ε/v choice, ``preset`` ("sd-turbo", "sdxl-turbo"; "none") the distilled model a file name with
    "turbo" in it implies (``sd_config.choose_preset``); the notes explain both. Returns ``components``."""
    source = str(path)
    state, metadata = load_weight_file(path)
    config = config or detect_config(state, source)
    config, preset_note = choose_preset(config, preset, [Path(path).name], source=source)
    chosen, why = choose_prediction(config, state, metadata, prediction)
    if config.family == "sd2" and chosen != config.prediction:
        config = config.with_(size=768 if chosen == "v" else 512)  # the v models are the 768 ones
    config = config.with_(prediction=chosen)
    models, layouts = build_models(config), single_file_layouts(config)
    if ema and has_ema(state):
        state = with_ema_weights(state, models["unet"], layouts["unet"], source)
    state = from_openclip(state)  # OpenCLIP encoders (SD 2, SDXL) fuse q/k/v; other keys pass untouched
    for name, model in models.items():
        import_state_dict(model, state, layouts[name], f"{source} ({name})", assign=True)
    notes = [f"prediction: {chosen} ({why})"] + ([preset_note] if preset_note else [])
    return components(config, models, bundled_tokenizers(config), notes)


def save_single_file(pipe, path: str | Path) -> Path:
    """Write the pipeline as one original-layout ``.safetensors`` file (the layout other UIs load)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single files are written as .safetensors (never pickles), got {path.name}")
    if pipe.config.family.startswith("sd2") and pipe.config.text.output_layer == -1:
        raise ValueError("this SD 2 text encoder came from a diffusers folder, which drops OpenCLIP's last block; "
                         "an original single file needs all of it (keep the folder, or start from a single file)")
    layouts = single_file_layouts(pipe.config)
    state: dict[str, torch.Tensor] = {}
    for name, model in pipeline_models(pipe).items():
        exported = export_state_dict(model, layouts[name])
        state |= to_openclip(exported) if layouts[name].prefix in (OPENCLIP_PREFIX, SDXL_PREFIXES[1], REFINER_PREFIX) \
            else exported
    atomic_save_safetensors({k: v.contiguous() for k, v in state.items()}, path)
    return path


# --- diffusers folders ---------------------------------------------------------------------------
def family_of(unet: UNetConfig, first_encoder: bool = True) -> str:
    """SDXL is the UNet with added (pooled text, size) conditioning, its refiner that without the first text
    encoder; SD 2 has linear projections in its transformer blocks, SD 1 1×1 convolutions."""
    if unet.added_cond_dim:
        return "sdxl" if first_encoder else "sdxl-refiner"
    return ("sd2" if unet.linear_projection else "sd1") + ("-inpainting" if unet.in_channels == 9 else "")


def load_diffusers_folder(folder: str | Path, *, variant: str | None = None, prediction: str | None = None,
                          preset: str | None = None) -> dict[str, Any]:
    """A diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
    and for SDXL ``text_encoder_2/``, ``tokenizer_2/``; the SDXL refiner has only the latter pair); the prediction
    type comes from ``scheduler_config.json`` unless ``prediction`` overrides it. A distilled model's sampling
    defaults come from ``preset``, else from its names or the scheduler it ships (``sd_config.choose_preset``)."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    unet_cfg = unet_config_from_diffusers(read_json(folder / "unet" / "config.json"))
    vae_cfg = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"))
    first = (folder / "text_encoder").is_dir()
    text_cfg = text_encoder_config_from_transformers(read_json(folder / "text_encoder" / "config.json")) if first else None
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer") if first else None
    if tokenizer is not None and tokenizer.max_length > text_cfg.max_length:
        raise CheckpointError(f"{folder}: the tokenizer frames prompts as {tokenizer.max_length} tokens, but the "
                              f"text encoder has positions for {text_cfg.max_length}")
    tokenizer_2, sdxl = None, {}
    if (folder / "text_encoder_2").is_dir():  # SDXL's pipeline reads both encoders' raw penultimate states
        penultimate = dict(output_layer=-2, final_norm_on_hidden=False)
        if text_cfg is not None:
            text_cfg = text_cfg.with_(**penultimate)
        text_2 = text_encoder_config_from_transformers(read_json(folder / "text_encoder_2" / "config.json")).with_(**penultimate)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        sdxl = dict(text_2=text_2, zero_uncond=index.get("force_zeros_for_empty_prompt", True),
                    requires_aesthetics_score=index.get("requires_aesthetics_score", False))
    elif not first:
        raise CheckpointError(f"{folder} has no text encoder (neither text_encoder/ nor text_encoder_2/)")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    sampling = sampling_from_diffusers(scheduler)
    why = "the folder's scheduler_config.json"
    if prediction is not None:
        sampling, why = sampling.with_(prediction=prediction), "set by the caller"
    size = read_json(folder / "unet" / "config.json").get("sample_size", 64) * vae_cfg.downsample_factor
    pad = "zero" if (tokenizer or tokenizer_2).pad_id == 0 else "eos"
    config = lcm_defaults(StableDiffusionConfig(unet=unet_cfg, vae=vae_cfg, text=text_cfg, pad=pad,
                                                family=family_of(unet_cfg, first), size=size, sampling=sampling, **sdxl))
    config, preset_note = choose_preset(config, preset, folder_names(folder, index), scheduler.get("_class_name"),
                                        str(folder), keep_sampling=True)
    models = build_models(config)
    for name, model in models.items():
        path = weight_file(folder / name, WEIGHT_STEMS[name], variant, what=name)
        import_state_dict(model, load_state_dict_file(path), folder_layouts(config)[name], str(path), assign=True)
    notes = [f"prediction: {config.prediction} ({why})"] + ([preset_note] if preset_note else [])
    return components(config, models, (tokenizer, tokenizer_2), notes)


def folder_names(folder: Path, index: dict[str, Any]) -> list[str]:
    """What a diffusers folder is called: its name, the hub repository of a hub cache snapshot
    (``models--stabilityai--sd-turbo/snapshots/<hash>``) and the ``_name_or_path`` diffusers may record."""
    folder = folder.resolve()
    names = [folder.name, str(index.get("_name_or_path") or "")]
    if folder.parent.name == "snapshots":
        names.append(folder.parent.parent.name)
    return [name for name in names if name]


def folder_layouts(config: StableDiffusionConfig) -> dict[str, Layout]:
    layouts = {"unet": unet_layout(config.unet, "diffusers"), "vae": vae_layout(config.vae, "diffusers")}
    if config.text is not None:
        layouts["text_encoder"] = text_encoder_layout(config.text, "transformers")
    return layouts | ({"text_encoder_2": text_encoder_layout(config.text_2, "transformers")} if config.text_2 else {})


def save_diffusers_folder(pipe, folder: str | Path) -> Path:
    """Write the pipeline as a diffusers folder that diffusers' ``from_pretrained`` loads."""
    folder = Path(folder)
    c = pipe.config
    # the refiner is diffusers' img2img pipeline: its only pipeline that runs without the first encoder
    pipeline_class = "StableDiffusionXLImg2ImgPipeline" if c.text is None else "StableDiffusionXLPipeline" if c.text_2 else \
        "StableDiffusionInpaintPipeline" if c.inpainting else "StableDiffusionPipeline"
    first = [["transformers", "CLIPTextModel"], ["transformers", "CLIPTokenizer"]] if c.text else [[None, None]] * 2
    # a distilled model's default sampler as the scheduler it ships (so the folder reads back as one); else DDIM
    scheduler_class = {v: k for k, v in SHIPPED_SAMPLERS.items()}.get(c.default_sampler, "DDIMScheduler")
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": first[0], "tokenizer": first[1],
             "scheduler": ["diffusers", scheduler_class]}
    if c.text_2:
        index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": c.zero_uncond}
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    if c.requires_aesthetics_score:
        index["requires_aesthetics_score"] = True
    configs = {"model_index.json": index, "scheduler/scheduler_config.json": sampling_to_diffusers(c.sampling, scheduler_class),
               "unet/config.json": unet_config_to_diffusers(c.unet) | {"sample_size": c.size // c.vae.downsample_factor},
               "vae/config.json": vae_config_to_diffusers(c.vae)}
    if c.text:
        configs["text_encoder/config.json"] = text_encoder_config_to_transformers(c.text)
    if c.text_2:
        configs["text_encoder_2/config.json"] = text_encoder_config_to_transformers(c.text_2)
    for name, cfg in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(cfg, indent=2))
    if pipe.tokenizer is not None:
        pipe.tokenizer.save_pretrained(folder / "tokenizer")
    if pipe.tokenizer_2 is not None:
        pipe.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    layouts = folder_layouts(c)
    for name, model in pipeline_models(pipe).items():
        state = {k: v.contiguous() for k, v in export_state_dict(model, layouts[name]).items()}
        if name.startswith("text_encoder"):  # an encoder read through its final norm early is cut there, as diffusers does
            used = configs[f"{name}/config.json"]["num_hidden_layers"]
            state = {k: v for k, v in state.items() if not (m := re.search(r"\.layers\.(\d+)\.", k)) or int(m[1]) < used}
        atomic_save_safetensors(state, folder / name / f"{WEIGHT_STEMS[name]}.safetensors")
    return folder


def inspect_checkpoint(path: str | Path, config: StableDiffusionConfig | None = None) -> dict[str, Any]:
    """What a checkpoint holds: family, components with parameter counts and dtypes, EMA, unrecognised keys.

    ``config`` skips family detection for single files, as in ``ldm.load_pipeline``."""
    path = Path(path)
    unrecognised: list[str] = []
    if path.is_dir():
        parts = load_diffusers_folder(path)
        config, ema, notes, models = parts["config"], False, parts["notes"], pipeline_models(SimpleNamespace(**parts))
        dtypes = {name: {p.dtype for p in m.parameters()} for name, m in models.items()}
    else:
        state, metadata = load_weight_file(path)
        config, ema = config or detect_config(state, str(path)), has_ema(state)
        config, preset_note = choose_preset(config, None, [path.name], source=str(path))
        prediction, why = choose_prediction(config, state, metadata, None)
        config, notes = config.with_(prediction=prediction), [f"prediction: {prediction} ({why})"]
        notes += [preset_note] if preset_note else []
        state = from_openclip(state)
        models, layouts = build_models(config), single_file_layouts(config)
        names = {name: foreign_names(m, layouts[name]).values() for name, m in models.items()}
        claimed = {n for ns in names.values() for n in ns} | {ema_key(n) for n in names["unet"]}
        unrecognised = sorted(k for k in state
                              if k not in claimed and k not in SCHEDULE_BUFFERS and not k.endswith("position_ids"))
        dtypes = {name: {state[n].dtype for n in ns if n in state} for name, ns in names.items()}
    return {
        "path": str(path), "format": "diffusers folder" if path.is_dir() else "single file", "family": config.family,
        "ema": ema, "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "dtypes": {name: sorted(str(d).replace("torch.", "") for d in ds) for name, ds in dtypes.items()},
        "unrecognised": unrecognised, "notes": notes, "config": json.loads(json.dumps(asdict(config), default=str)),
    }
