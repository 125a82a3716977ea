"""LoRA files as people share them, read into ``ldm.lora.LoRA``s and written back.

Two layouts name the adapted layers:

- kohya / A1111 (``.safetensors``): ``lora_unet_{module}``, ``lora_te_{module}`` (SD 1/2) or ``lora_te1_`` /
  ``lora_te2_`` (SDXL's two text encoders), the module's diffusers / transformers name with dots as
  underscores (some SDXL files use the original ``input_blocks_…`` names instead), each with
  ``.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha``;
- diffusers / peft (``pytorch_lora_weights.safetensors``): ``unet.{module}``, ``text_encoder.{module}``,
  ``text_encoder_2.{module}`` with ``.lora_A.weight`` / ``.lora_B.weight`` (older files: ``.lora.down.weight`` /
  ``.lora.up.weight``, text encoders ``.lora_linear_layer.down.weight`` / ``…up.weight``), α from the peft config
  diffusers keeps in the file's metadata, or ``.alpha`` keys.

Module names are matched through ``ldm.convert``'s rule tables (``unet_layout``, ``text_encoder_layout``), so every
name ldm can load weights under is a name a LoRA may adapt, and a name that matches no layer is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_save_safetensors, load_weight_file, safe_load, weight_file_keys
from ..lora import LoRA, LoRALayer
from .clip import text_encoder_layout
from .core import foreign_names
from .unet import unet_layout

Format = Literal["kohya", "diffusers"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FAMILY_NAMES = {"sd1": "SD 1", "sd2": "SD 2", "sdxl": "SDXL"}
KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                  "lora_te2": "text_encoder_2"}
# A (down), B (up) and α of one module, in either layout; the module name is what comes before.
KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[12]?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\."
                           r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                           r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
# Adapter kinds of other tools, recognised so the error can say what the file is.
OTHER_KINDS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with a Tucker core (lora_mid)",
               "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff_b": "full-weight differences"}


@dataclass
class LoRAModule:
    """One adapted module as a file holds it: A (r × d_in[, k, k]), B (d_out × r[, 1, 1]), α (None: α = r)."""
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoRAFile:
    """A LoRA file's modules per component ("unet", "text_encoder", "text_encoder_2"), under the file's names."""
    path: Path
    format: Format
    modules: dict[str, dict[str, LoRAModule]] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        return lora_family(self)

    def ranks(self) -> list[int]:
        return sorted({m.rank for part in self.modules.values() for m in part.values()})

    def alphas(self) -> list[float | None]:
        return sorted({m.alpha for part in self.modules.values() for m in part.values()}, key=lambda a: (a is None, a))


def read_lora(path: str | Path) -> LoRAFile:
    """A LoRA file in kohya or diffusers layout (``.pt`` / ``.bin`` through the weights-only loader only).
    CheckpointError for a truncated or corrupt file, a file that is not a LoRA, or another kind of adapter."""
    path = Path(path)
    try:
        tensors, metadata = load_weight_file(path)
    except CheckpointError:
        if _a1111_embedding(path):  # its vectors are nested, so load_weight_file finds no tensors
            raise CheckpointError(f"{path} is a textual-inversion embedding, not a LoRA: load it with "
                                  "--embedding") from None
        raise
    for marker, kind in OTHER_KINDS.items():
        if any(marker in key for key in tensors):
            raise CheckpointError(f"{path} is a {kind} adapter, which ldm does not load (only LoRA and LoCon)")
    kohya = [k for k in tensors if KOHYA_KEY.match(k)]
    diffusers = [k for k in tensors if DIFFUSERS_KEY.match(k)]
    if not kohya and not diffusers:
        if any(k.endswith(("emb_params", "clip_l", "clip_g")) for k in tensors):
            raise CheckpointError(f"{path} is a textual-inversion embedding, not a LoRA: load it with --embedding")
        raise CheckpointError(f"{path} holds no LoRA weights (keys like {sorted(tensors)[:3]})")
    file = LoRAFile(path, "kohya" if len(kohya) >= len(diffusers) else "diffusers")
    pattern = KOHYA_KEY if file.format == "kohya" else DIFFUSERS_KEY
    unknown = [k for k in tensors if not pattern.match(k)]
    if unknown:
        raise CheckpointError(f"{path}: keys that are not LoRA weights of the {file.format} layout: "
                              f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
    for key, value in tensors.items():
        prefix, module, what = pattern.match(key).groups()
        component = KOHYA_PREFIXES.get(prefix, prefix)
        entry = file.modules.setdefault(component, {}).setdefault(module, LoRAModule())
        if what == "alpha":
            entry.alpha = float(value)
        elif what in ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight"):
            entry.down = value
        else:
            entry.up = value
    _alphas_from_metadata(file, metadata)
    broken = [f"{c}.{m}" for c, part in file.modules.items() for m, e in part.items() if e.down is None or e.up is None]
    if broken:
        raise CheckpointError(f"{path}: modules with only one of the two LoRA matrices: {', '.join(broken[:5])}")
    return file


def _a1111_embedding(path: Path) -> bool:
    """Whether ``path`` is a pickle of A1111's embedding dict (``string_to_param``: {"*": vectors}), read
    weights-only."""
    if path.suffix.lower() == ".safetensors" or not path.is_file():
        return False
    try:
        data = safe_load(path)
    except CheckpointError:
        return False
    return isinstance(data, dict) and "string_to_param" in data


def _alphas_from_metadata(file: LoRAFile, metadata: dict) -> None:
    """diffusers keeps each component's peft config (``r``, ``lora_alpha``, ``alpha_pattern``) in the safetensors
    metadata as ``lora_adapter_metadata``; without it (and without α keys) α = r."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    config = json.loads(raw)
    for component, part in file.modules.items():
        alpha = config.get(f"{component}.lora_alpha")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        for module, entry in part.items():
            if entry.alpha is not None:
                continue
            matched = [a for p, a in patterns.items() if re.fullmatch(rf"(.*\.)?({p})", module)]
            entry.alpha = float(matched[0] if matched else alpha) if (matched or alpha is not None) else None


def looks_like_lora(path: str | Path) -> bool:
    """Whether ``path`` is a file whose tensor names are LoRA weights (kohya or diffusers layout); False for folders,
    unreadable files and other weight files (big pickles are not opened: LoRAs are small)."""
    path = Path(path)
    if not path.is_file() or (path.suffix.lower() != ".safetensors" and path.stat().st_size > 2**30):
        return False
    try:
        keys = weight_file_keys(path)
    except (CheckpointError, OSError):
        return False
    return any(KOHYA_KEY.match(k) or DIFFUSERS_KEY.match(k) for k in keys)


def lora_family(file: LoRAFile) -> str | None:
    """"sd1", "sd2" or "sdxl" from key names and shapes, None when the file does not tell: a second text encoder is
    SDXL's; otherwise the width cross-attention keys are projected from (768 SD 1, 1024 SD 2, 2048 SDXL), else the
    text encoder's width (768 SD 1, 1024 SD 2)."""
    if "text_encoder_2" in file.modules:
        return "sdxl"
    for module, entry in file.modules.get("unet", {}).items():
        if re.search(r"attn2[._]to_[kv]$", module):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(entry.down.shape[1])
    for entry in file.modules.get("text_encoder", {}).values():
        return {768: "sd1", 1024: "sd2"}.get(entry.down.shape[1])
    return None


def module_spellings(model: nn.Module, component: str) -> list[dict[str, str]]:
    """For each layout a file may use, ldm's name → the layout's (dotted) name of ``model``'s Linear and Conv2d
    modules: diffusers / transformers first, then for a UNet the original ``input_blocks`` naming."""
    if component == "unet":
        layouts = [unet_layout(model.config, "diffusers"), unet_layout(model.config, "original")]
    else:
        layouts = [text_encoder_layout(model.config, "transformers")]
    adaptable = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return [{key.removesuffix(".weight"): foreign.removesuffix(".weight")
             for key, foreign in foreign_names(model, layout).items()
             if key.endswith(".weight") and key.removesuffix(".weight") in adaptable} for layout in layouts]


def module_names(model: nn.Module, component: str) -> dict[str, str]:
    """Every foreign spelling of ``model``'s adaptable modules, dotted and with dots as underscores (kohya) → ldm's
    module name. A text encoder's names are also taken without ``text_model.``: transformers 5's CLIPTextModel
    has no such level, so the LoRAs peft and diffusers make on it (and kohya files converted from them) lack it."""
    names: dict[str, str] = {}
    for spelling in module_spellings(model, component):
        for module, foreign in spelling.items():
            for name in {foreign, foreign.removeprefix("text_model.")}:
                names[name] = names[name.replace(".", "_")] = module
    return names


def build_loras(file: LoRAFile, models: dict[str, nn.Module], name: str, scale: float = 1.0) -> dict[str, LoRA]:
    """The file's LoRAs for ``models`` (component → model). Every module of the file must match a layer of the
    right kind and shape; those that do not are reported by name."""
    loras, unmatched = {}, []
    for component, part in file.modules.items():
        model = models.get(component)
        if model is None:
            unmatched += [f"{component}: {m}" for m in list(part)[:3]]
            continue
        names, modules = module_names(model, component), dict(model.named_modules())
        layers = {}
        for module, entry in part.items():
            target = names.get(module)
            if target is None:
                unmatched.append(f"{component}: {module}")
                continue
            layer = LoRALayer(modules[target], entry.rank, entry.alpha)
            layer.load(entry.down, entry.up, f"{file.path} ({component}: {module})")
            layers[target] = layer
        loras[component] = LoRA(layers, name, scale)
    if unmatched:
        raise CheckpointError(f"{file.path}: LoRA modules that match no layer of the model: "
                              f"{', '.join(unmatched[:8])}{f' … ({len(unmatched)} in all)' if len(unmatched) > 8 else ''}")
    return loras


def peft_name(name: str) -> str:
    """A module's name as peft's config targets it: peft matches by suffix, so a text encoder's is given without
    ``text_model.``, to match both transformers 4's CLIPTextModel and transformers 5's, which has no such level."""
    return name.removeprefix("text_model.")


def lora_state_dict(loras: dict[str, LoRA], models: dict[str, nn.Module], fmt: Format = "kohya",
                    sdxl: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of ``loras`` in ``fmt``: kohya names from diffusers module names, dots as
    underscores; diffusers names with peft's lora_A / lora_B and its config in the metadata."""
    tensors, metadata, config = {}, {"format": "pt"}, {}
    for component, lora in loras.items():
        names = module_spellings(models[component], component)[0]
        alphas = {}
        for module, layer in lora.items():
            down, up = layer.down.weight.detach().contiguous(), layer.up.weight.detach().contiguous()
            alpha = float(layer.alpha or layer.rank)
            if fmt == "kohya":
                prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te",
                          "text_encoder_2": "lora_te2"}[component]
                stem = f"{prefix}_{names[module].replace('.', '_')}"
                tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                            f"{stem}.alpha": torch.tensor(alpha)}
            else:
                stem = f"{component}.{names[module]}"
                tensors |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
                alphas[peft_name(names[module])] = alpha
        if fmt == "diffusers":
            ranks = {peft_name(names[m]): layer.rank for m, layer in lora.items()}
            rank = max(set(ranks.values()), key=list(ranks.values()).count)
            alpha = max(set(alphas.values()), key=list(alphas.values()).count)
            config |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                       f"{component}.target_modules": sorted(ranks),
                       f"{component}.rank_pattern": {k: v for k, v in ranks.items() if v != rank},
                       f"{component}.alpha_pattern": {k: v for k, v in alphas.items() if v != alpha}}
    if config:
        metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
    return tensors, metadata


def save_lora(path: str | Path, loras: dict[str, LoRA], models: dict[str, nn.Module], fmt: Format = "kohya",
              sdxl: bool = False) -> Path:
    """Write ``loras`` as one ``.safetensors`` file in ``fmt`` (atomically), loadable by A1111, ComfyUI and diffusers."""
    tensors, metadata = lora_state_dict(loras, models, fmt, sdxl or "text_encoder_2" in loras)
    path = Path(path)
    atomic_save_safetensors(tensors, path, metadata=metadata)
    return path


def describe_lora(path: str | Path) -> dict:
    """What ``ldm inspect`` says about a LoRA file: layout, family, ranks, α, layers per component, conv layers."""
    file = read_lora(path)
    parts = {c: len(part) for c, part in file.modules.items()}
    convs = sum(e.down.dim() == 4 and e.down.shape[-1] > 1 for part in file.modules.values() for e in part.values())
    family = file.family
    return {"kind": "LoRA", "format": file.format, "family": FAMILY_NAMES.get(family, "unknown"),
            "ranks": file.ranks(), "alphas": file.alphas(), "layers": parts, "conv_layers": convs}


__all__ = ["FAMILY_NAMES", "LoRAFile", "LoRAModule", "build_loras", "describe_lora", "lora_family",
           "looks_like_lora", "lora_state_dict", "module_names", "module_spellings", "read_lora", "save_lora"]
