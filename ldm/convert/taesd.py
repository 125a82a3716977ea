"""TAESD weights (``ldm.taesd.AutoencoderTiny``) in their two published layouts, and the one loader for both.

original  (madebyollin/taesd: ``taesd_encoder.pth`` / ``taesd_decoder.pth``, also ``.safetensors``; ``taesdxl_*``
          for SDXL) — one file per half, each the state dict of an ``nn.Sequential``, so the keys are positions:
          encoder  0 conv_in · 1 Block · 2 down, 3–5 Blocks · 6 down, 7–9 · 10 down, 11–13 · 14 conv_out
          decoder  0 Clamp · 1 conv_in · 2 ReLU · 3–5 Blocks, 6 Upsample, 7 up · 8–10, 11, 12 · 13–15, 16, 17 ·
                   18 Block · 19 conv_out
          and a Block's convolutions sit at ``conv.0`` / ``conv.2`` / ``conv.4`` (ReLUs between).
diffusers (``AutoencoderTiny`` folders: ``config.json`` + ``diffusion_pytorch_model.safetensors``) — one file,
          ``encoder.layers.N.…`` / ``decoder.layers.N.…``: the same Sequentials, except that the decoder's Clamp is
          done in its forward, so its positions are one less.

The weights cannot tell SD 1/2's TAESD from SDXL's (same shapes, other training), so the latent space ("family") is
read from the file or folder name (``taesdxl`` → "sdxl", ``taesd`` → "sd"), or given by the caller;
``check_latent_space`` refuses a pairing with the wrong pipeline by name.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal

import torch

from ..checkpoint import WEIGHT_FILE_SUFFIXES, CheckpointError, load_state_dict_file, read_json, weight_file
from ..taesd import AutoencoderTiny, TAESDConfig, latent_space
from .core import Layout, Rule, import_state_dict

Part = Literal["encoder", "decoder"]
SPACES = {"sd": "SD 1/2", "sdxl": "SDXL"}  # latent space → what it is called in messages
WEIGHTS = {"sd": "taesd", "sdxl": "taesdxl"}  # latent space → the TAESD to use for it
OTHER_LATENTS = {16: "TAESD3 (SD 3) and TAEF1 (FLUX.1) have 16", 32: "TAEF2 (FLUX.2) and TAESANA have 32"}


def sequential_positions(config: TAESDConfig, part: Part) -> dict[str, int]:
    """ldm's module names in one half (``conv_in``, ``stages.1.down``, ``stages.1.blocks.0``, …) → their index in
    the original ``nn.Sequential``, counting the layers without weights (Clamp, ReLU, Upsample) too."""
    if part == "encoder":
        positions, i = {"conv_in": 0}, 1
        for k, n in enumerate(config.encoder_blocks):
            if k > 0:
                positions[f"stages.{k}.down"], i = i, i + 1
            for j in range(n):
                positions[f"stages.{k}.blocks.{j}"], i = i, i + 1
    else:
        positions, i = {"conv_in": 1}, 3  # 0 Clamp, 1 conv_in, 2 ReLU
        last = len(config.decoder_blocks) - 1
        for k, n in enumerate(config.decoder_blocks):
            for j in range(n):
                positions[f"stages.{k}.blocks.{j}"], i = i, i + 1
            if k < last:
                positions[f"stages.{k}.up"], i = i + 1, i + 2  # after the Upsample
    positions["conv_out"] = i
    return positions


_BLOCK_CONV: Rule = (r"\.conv([123])\.", lambda m: f".conv.{2 * (int(m[1]) - 1)}.")
_MODULE = r"(conv_in|conv_out|stages\.\d+\.(?:blocks\.\d+|down|up))\."


def taesd_layout(config: TAESDConfig, fmt: Literal["original", "diffusers"], part: Part | None = None) -> Layout:
    """The naming of TAESD's weights in ``fmt``. original: one half's own names (``model.encoder`` or
    ``model.decoder``), as in its file; diffusers: the whole model's names, as in ``AutoencoderTiny``'s file."""
    if fmt == "original":
        if part is None:
            raise ValueError("the original layout keeps each half in its own file: say which part")
        positions = sequential_positions(config, part)
        return Layout([_BLOCK_CONV, ("^" + _MODULE, lambda m: f"{positions[m[1]]}.")])
    positions = {p: sequential_positions(config, p) for p in ("encoder", "decoder")}
    shift = {"encoder": 0, "decoder": 1}  # diffusers' decoder Sequential has no Clamp layer

    def layer(m: re.Match) -> str:
        return f"{m[1]}.layers.{positions[m[1]][m[2]] - shift[m[1]]}."

    return Layout([_BLOCK_CONV, (r"^(encoder|decoder)\." + _MODULE, layer)])


def taesd_config_from_diffusers(cfg: dict, source: str = "config.json") -> TAESDConfig:
    """A diffusers ``AutoencoderTiny`` config as a ``TAESDConfig``; settings ldm's TAESD does not have are refused."""
    widths = set(cfg.get("encoder_block_out_channels", [64])) | set(cfg.get("decoder_block_out_channels", [64]))
    expected = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "scaling_factor": 1.0,
                "shift_factor": 0.0}
    odd = [f"{key}={cfg[key]!r}" for key, value in expected.items() if cfg.get(key, value) not in (value, None)]
    if len(widths) != 1:
        odd.append(f"block widths {sorted(widths)}")
    if odd:
        raise CheckpointError(f"{source}: an AutoencoderTiny with {', '.join(odd)}, which ldm's TAESD does not have "
                              f"(it has {', '.join(f'{k}={v!r}' for k, v in expected.items())} and one width)")
    config = TAESDConfig(
        image_channels=cfg.get("in_channels", 3), latent_channels=cfg.get("latent_channels", 4), width=widths.pop(),
        encoder_blocks=tuple(cfg.get("num_encoder_blocks", (1, 3, 3, 3))),
        decoder_blocks=tuple(cfg.get("num_decoder_blocks", (3, 3, 3, 1))),
        latent_magnitude=float(cfg.get("latent_magnitude", 3.0)), latent_shift=float(cfg.get("latent_shift", 0.5)))
    if cfg.get("out_channels", config.image_channels) != config.image_channels:
        raise CheckpointError(f"{source}: {cfg['in_channels']} image channels in but {cfg['out_channels']} out")
    _check_latent_channels(config.latent_channels, source)
    return config


def _check_latent_channels(channels: int, source: str) -> None:
    if channels != 4:
        known = f" ({OTHER_LATENTS[channels]})" if channels in OTHER_LATENTS else ""
        raise CheckpointError(f"{source} is a tiny autoencoder for {channels}-channel latents{known}, but Stable "
                              "Diffusion 1, 2 and XL have 4: use taesd (SD 1/2) or taesdxl (SDXL)")


# ---------------------------------------------------------------------------------------------- latent spaces


def family_from_name(path: str | Path) -> str | None:
    """The latent space a file or folder name says (``taesdxl…`` → "sdxl", ``taesd…`` → "sd"), else None. Looks at
    the name, its folder's, and a Hugging Face cache's repository folder (``models--madebyollin--taesdxl``)."""
    path = Path(path)
    names = [path.name, path.parent.name] + [p for p in path.parts if p.startswith("models--")]
    for name in (n.lower() for n in names):
        if "taesdxl" in name:
            return "sdxl"
        if re.search(r"taesd(?![0-9])", name):
            return "sd"
    return None


def check_latent_space(taesd: AutoencoderTiny, family: str) -> None:
    """Refuse a TAESD made for another latent space than the pipeline's (``family``: "sd1", "sd2", "sdxl", …),
    naming both. A TAESD whose space is unknown (no name, no ``family=``) cannot be checked: a warning says so."""
    wanted = latent_space(family)
    if taesd.family == "unknown":
        warnings.warn(f"{taesd.source}: cannot tell whether this TAESD is for SD 1/2 or SDXL latents (the name says "
                      "neither taesd nor taesdxl); pass family= to load_taesd to have it checked", stacklevel=2)
        return
    if taesd.family != wanted:
        model = "SDXL" if wanted == "sdxl" else f"SD {family[2]}"
        raise ValueError(f"{taesd.source} is a TAESD for {SPACES[taesd.family]} latents, but this is an {model} model "
                         f"({family}): use {WEIGHTS[wanted]}")


def _resolve_family(given: str | None, path: Path) -> str:
    named = family_from_name(path)
    if given is None:
        return named or "unknown"
    family = latent_space(given)
    if named is not None and named != family:
        raise ValueError(f"family={given!r} was asked for, but {path.name} is named as a TAESD for "
                         f"{SPACES[named]} latents ({WEIGHTS[named]})")
    return family


# ---------------------------------------------------------------------------------------------- loading


def load_taesd(path: str | Path, family: str | None = None) -> AutoencoderTiny:
    """A TAESD from ``path``, in eval mode and float32:

    - a diffusers ``AutoencoderTiny`` folder (``config.json`` + weights): encoder and decoder;
    - one original file, ``taesd_decoder.*`` or ``taesd_encoder.*`` (which half is read from its keys): that half;
    - a folder holding ``<name>_encoder.*`` and/or ``<name>_decoder.*`` (``taesd_…``, ``taesdxl_…``): both halves;
    - a single diffusers-layout weight file (``encoder.layers.…``).

    ``family``: the latent space, "sd" or "sdxl" (or a pipeline family such as "sd1", "sdxl"), when the name does
    not say it; a name that says otherwise is an error. Files are read without running pickled code
    (``checkpoint.load_state_dict_file``); every key must be claimed and every shape match, or the error names them.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        model, named = _load_diffusers_folder(path), path
    elif path.is_dir():
        model, named = _load_original_folder(path, family)
    elif path.is_file():
        model, named = _load_file(path), path
    else:
        raise CheckpointError(f"TAESD weights not found: {path}")
    model.family = _resolve_family(family, named)
    return model.eval()


def _load_diffusers_folder(folder: Path) -> AutoencoderTiny:
    cfg = read_json(folder / "config.json")
    if cfg.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise CheckpointError(f"{folder} holds a diffusers {cfg['_class_name']}, not an AutoencoderTiny (TAESD)")
    config = taesd_config_from_diffusers(cfg, str(folder / "config.json"))
    file = weight_file(folder, "diffusion_pytorch_model", what="AutoencoderTiny")
    model = AutoencoderTiny(config, source=folder.name)
    return import_state_dict(model, load_state_dict_file(file), taesd_layout(config, "diffusers"), source=str(file))


def _load_file(path: Path) -> AutoencoderTiny:
    state = load_state_dict_file(path)
    if any(key.startswith(("encoder.layers.", "decoder.layers.")) for key in state):
        return _from_diffusers_file(path, state)
    part, config = _read_original(path, state)
    model = AutoencoderTiny(config, encoder=part == "encoder", decoder=part == "decoder", source=path.name)
    import_state_dict(getattr(model, part), state, taesd_layout(config, "original", part), source=str(path))
    return model


def _from_diffusers_file(path: Path, state: dict[str, torch.Tensor]) -> AutoencoderTiny:
    """A bare ``diffusion_pytorch_model.safetensors`` of an AutoencoderTiny, with the default block counts."""
    has = {part: any(k.startswith(f"{part}.layers.") for k in state) for part in ("encoder", "decoder")}
    first = state.get("decoder.layers.0.weight", state.get("encoder.layers.0.weight"))
    if first is None or first.dim() != 4:
        raise CheckpointError(f"{path}: an AutoencoderTiny file without its first convolution (layers.0.weight)")
    encoder = {int(m[1]): v for k, v in state.items() if (m := re.fullmatch(r"encoder\.layers\.(\d+)\.weight", k))}
    latents = first.shape[1] if has["decoder"] else encoder[max(encoder)].shape[0]  # decoder's input, encoder's output
    _check_latent_channels(latents, path.name)
    config = TAESDConfig(width=first.shape[0])
    model = AutoencoderTiny(config, encoder=has["encoder"], decoder=has["decoder"], source=path.name)
    return import_state_dict(model, state, taesd_layout(config, "diffusers"), source=str(path))


def _read_original(path: Path, state: dict[str, torch.Tensor]) -> tuple[Part, TAESDConfig]:
    """Which half an original-layout file holds (from its keys: the encoder's first convolution is ``0.``, the
    decoder's ``1.``, after its Clamp), checked against its name, and the config its shapes give."""
    convs = {int(m[1]): v for k, v in state.items() if (m := re.fullmatch(r"(\d+)\.weight", k)) and v.dim() == 4}
    if 0 in convs:
        part: Part = "encoder"
    elif 1 in convs:
        part = "decoder"
    else:
        shown = ", ".join(list(state)[:6])
        raise CheckpointError(f"{path} is neither a TAESD encoder (0.weight) nor decoder (1.weight); its keys: {shown}")
    named = next((p for p in ("encoder", "decoder") if p in path.stem.lower()), None)
    if named not in (None, part):
        raise CheckpointError(f"{path} is named as a TAESD {named}, but its weights are a {part}'s")
    first, last = convs[min(convs)], convs[max(convs)]
    latents, image = (last.shape[0], first.shape[1]) if part == "encoder" else (first.shape[1], last.shape[0])
    _check_latent_channels(latents, path.name)
    return part, TAESDConfig(image_channels=image, latent_channels=latents, width=first.shape[0])


_PREFERRED = {suffix: i for i, suffix in enumerate(WEIGHT_FILE_SUFFIXES)}  # .safetensors first


def _load_original_folder(folder: Path, family: str | None) -> tuple[AutoencoderTiny, Path]:
    """``<name>_encoder.*`` and ``<name>_decoder.*`` in ``folder`` (safetensors before pickles); one ``<name>``,
    chosen by ``family`` when the folder holds both taesd and taesdxl."""
    found: dict[str, dict[str, Path]] = {}
    for file in sorted(folder.iterdir(), key=lambda p: (_PREFERRED.get(p.suffix.lower(), 99), p.name)):
        m = re.fullmatch(r"(.+)_(encoder|decoder)", file.stem)
        if m and file.is_file() and file.suffix.lower() in WEIGHT_FILE_SUFFIXES:
            found.setdefault(m[1], {}).setdefault(m[2], file)
    if family is not None and len(found) > 1:
        found = {name: parts for name, parts in found.items() if family_from_name(name) == latent_space(family)}
    if len(found) != 1:
        looked = "config.json, or <name>_encoder.* / <name>_decoder.* (.safetensors, .pth, …)"
        if not found:
            raise CheckpointError(f"no TAESD weights in {folder} (looked for {looked})")
        raise CheckpointError(f"{folder} holds several TAESDs ({', '.join(sorted(found))}): pass one file, or family=")
    name, files = found.popitem()
    states, configs = {}, {}
    for part, file in files.items():
        states[part] = load_state_dict_file(file)
        _, configs[part] = _read_original(file, states[part])
    if len(set(configs.values())) > 1:
        raise CheckpointError(f"{folder}: {name}'s encoder and decoder do not fit together: {configs}")
    config = next(iter(configs.values()))
    source = files.get("decoder", files.get("encoder")).name
    model = AutoencoderTiny(config, encoder="encoder" in files, decoder="decoder" in files, source=source)
    for part, state in states.items():
        import_state_dict(getattr(model, part), state, taesd_layout(config, "original", part), source=str(files[part]))
    return model, folder / name


__all__ = ["check_latent_space", "family_from_name", "latent_space", "load_taesd", "sequential_positions",
           "taesd_config_from_diffusers", "taesd_layout"]
