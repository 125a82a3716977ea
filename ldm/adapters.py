"""The LoRAs loaded into a pipeline, by name: load, rescale, switch off, fuse, unload.

A pipeline (``StableDiffusion``, ``DiffusionPipeline``) inherits ``Adaptable`` and says which of its models a LoRA
may adapt (``lora_models``: "unet", "text_encoder", "text_encoder_2") and which family it is; everything else
is here. The arithmetic is ``ldm.lora``'s, the file layouts ``ldm.convert.lora``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .convert.lora import FAMILY_NAMES, build_loras, read_lora
from .lora import LoRA, attach, detach, fuse, unfuse


class Adaptable:
    """LoRA methods of a pipeline. ``pipe.load_lora(path, scale)`` attaches a file's LoRA unfused, so its scale
    can change between calls (``set_lora_scale``; 0 switches it off exactly) and several can be loaded at once;
    ``fuse_lora`` folds every loaded LoRA into the weights and ``unfuse_lora`` takes them out again, exactly;
    ``unload_lora`` removes one or all, leaving the base weights bit for bit as they were."""

    lora_family: str | None = None  # "sd1", "sd2", "sdxl"; None: any file whose layers match

    @property
    def lora_models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    @property
    def loras(self) -> dict[str, dict[str, LoRA]]:
        """Loaded LoRAs: name → {component: LoRA}."""
        if "_loras" not in self.__dict__:
            self._loras: dict[str, dict[str, LoRA]] = {}
        return self._loras

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Attach a LoRA file (kohya / A1111 or diffusers layout) at strength ``scale``; returns its name (the
        file's stem unless given). A file for another model family is refused, naming both."""
        file = read_lora(path)
        if self.lora_family and file.family and file.family != self.lora_family:
            raise ValueError(f"{path} is a LoRA for {FAMILY_NAMES[file.family]}, and this pipeline is "
                             f"{FAMILY_NAMES[self.lora_family]}")
        name = name or Path(path).stem
        if name in self.loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded; unload it or pass another name")
        models = self.lora_models
        loras = build_loras(file, models, name, scale)
        for component, lora in loras.items():
            attach(models[component], lora.to(next(models[component].parameters()).device))
        self.loras[name] = loras
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """The strength of a loaded, unfused LoRA for the next calls (0: off, exactly the base model)."""
        for lora in self._named(name).values():
            if lora.fused:
                raise ValueError(f"LoRA {name!r} is fused into the weights: unfuse_lora() before changing its scale")
            lora.scale = float(scale)

    def fuse_lora(self) -> None:
        """Fold every loaded LoRA into its model's weights (W ← W + s·ΔW): no extra cost per call."""
        for loras in self.loras.values():
            for lora in loras.values():
                fuse(lora)

    def unfuse_lora(self) -> None:
        """Undo ``fuse_lora``: the exact weights from before, the LoRAs attached unfused again."""
        for loras in reversed(self.loras.values()):
            for lora in loras.values():
                unfuse(lora)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA ``name`` (None: all of them); the models' weights are the base weights, bit for bit."""
        for key in [name] if name is not None else list(self.loras):
            for lora in self._named(key).values():
                detach(lora)
            del self.loras[key]

    def _named(self, name: str) -> dict[str, LoRA]:
        if name not in self.loras:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loras) or 'none'})")
        return self.loras[name]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move the pipeline's models (``Pipeline.to``) and its LoRAs with them (those stay float32)."""
        super().to(device, dtype)
        for loras in self.loras.values():
            for lora in loras.values():
                lora.to(device=device)
        return self


__all__ = ["Adaptable"]
