"""Low-rank adaptation: a trainable update ΔW = (α/r)·B·A beside a frozen layer  [Hu et al. 2021, Eq. 3].

    h = W x + s · (α/r) · B (A x)       A: r × d_in ("down"), B: d_out × r ("up"), r ≪ min(d_in, d_out)

B starts at zero, so a new LoRA changes nothing until it is trained; α/r keeps the update's size
independent of the rank, and s is the user's strength (0 switches it off, 1 is as trained). For a
convolution A is a k×k convolution to r channels and B a 1×1 convolution back (LoCon).

A ``LoRA`` is a set of such layers for one model, keyed by the names of the modules they adapt. It is
not part of the model: ``attach`` adds each layer's output to its module's output through a forward
hook, so the model's weights and state dict stay as loaded, several LoRAs can be attached at once,
and each one's ``scale`` can change between calls. ``fuse`` instead adds s·ΔW into the weights (no
cost per call) and ``unfuse`` puts back the exact tensors it replaced.
"""

from __future__ import annotations

import math
import weakref
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

Adapted = nn.Linear | nn.Conv2d

# Which modules a new LoRA adapts, by the last part of their name: attention projections (the original
# paper's choice), then the feed-forward layers and the projections into and out of attention, then convolutions.
ATTENTION = ("to_q", "to_k", "to_v", "to_out", "attn.q", "attn.k", "attn.v", "attn.out")
TRANSFORMER = ATTENTION + ("proj", "ff.out", "proj_in", "proj_out", "fc1", "fc2")
CONV = TRANSFORMER + ("conv1", "conv2", "skip", "conv", "conv_in", "conv_out", "time_emb_proj")
TARGETS: dict[str, tuple[str, ...]] = {"attention": ATTENTION, "transformer": TRANSFORMER, "attention+conv": CONV}


class LoRALayer(nn.Module):
    """The update s·(α/r)·B·A of one ``nn.Linear`` or ``nn.Conv2d``, computed from the layer's input.

    ``alpha`` None or 0 means α = r (scaling 1), as kohya's files and peft read a missing α.
    Shapes: as the adapted layer's input → as its output.
    """

    def __init__(self, base: Adapted, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("LoRA on grouped convolutions is not supported")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False, padding_mode=base.padding_mode)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d layers, not {type(base).__name__}")
        self.rank, self.alpha = rank, alpha
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        nn.init.zeros_(self.up.weight)
        self.to(device=base.weight.device if base.weight.device.type != "meta" else "cpu")

    @property
    def scaling(self) -> float:
        """α / r."""
        return self.alpha / self.rank if self.alpha else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·B·A in the adapted layer's weight shape (d_out, d_in[, k, k])."""
        down, up = self.down.weight, self.up.weight
        if down.dim() == 2:
            return up @ down * self.scaling
        return torch.einsum("or,rikl->oikl", up.flatten(1), down) * self.scaling

    def load(self, down: torch.Tensor, up: torch.Tensor, source: str) -> None:
        """Copy a file's A and B in, reshaping 1×1 convolutions ↔ linear layers; shapes must otherwise agree."""
        for param, value, what in ((self.down.weight, down, "lora_down"), (self.up.weight, up, "lora_up")):
            if value.shape != param.shape:
                if value.numel() != param.numel() or {value.dim(), param.dim()} != {2, 4}:
                    raise ValueError(f"{source}: {what} has shape {tuple(value.shape)}, the layer needs "
                                     f"{tuple(param.shape)}")
                value = value.reshape(param.shape)
            with torch.no_grad():
                param.copy_(value)


class LoRA(nn.Module):
    """One adapter for one model: ``LoRALayer``s keyed by the names of the modules they adapt, with a strength
    ``scale`` (read at every call while attached, so it can change between calls)."""

    def __init__(self, layers: Mapping[str, LoRALayer], name: str = "lora", scale: float = 1.0):
        super().__init__()
        # ModuleDict keys cannot hold dots; module names always do.
        self.layers = nn.ModuleDict({key.replace(".", "/"): layer for key, layer in layers.items()})
        self.name, self.scale = name, float(scale)
        self.fused = False
        self._handles: list = []
        self._model: weakref.ref | None = None

    @classmethod
    def create(cls, model: nn.Module, rank: int = 4, alpha: float | None = None,
               targets: str | Sequence[str] = "attention", name: str = "lora") -> "LoRA":
        """A new (zero) LoRA on ``model``'s modules named by ``targets``: a key of ``TARGETS`` or a list of name
        endings (e.g. ``["attn2.to_k", "attn2.to_v"]``). ValueError when nothing matches."""
        modules = target_modules(model, targets)
        return cls({key: LoRALayer(module, rank, alpha) for key, module in modules.items()}, name)

    def items(self) -> Iterator[tuple[str, LoRALayer]]:
        for key, layer in self.layers.items():
            yield key.replace("/", "."), layer

    @property
    def targets(self) -> list[str]:
        return [key for key, _ in self.items()]

    @property
    def attached(self) -> bool:
        return bool(self._handles)


def target_modules(model: nn.Module, targets: str | Sequence[str]) -> dict[str, Adapted]:
    """``model``'s Linear and Conv2d modules whose names end in one of ``targets`` (a ``TARGETS`` key or endings)."""
    if isinstance(targets, str):
        if targets not in TARGETS:
            raise ValueError(f"unknown LoRA targets {targets!r}; known: {', '.join(TARGETS)}, or a list of "
                             "module-name endings")
        targets = TARGETS[targets]
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets)}
    if not found:
        raise ValueError(f"no Linear or Conv2d layer of {type(model).__name__} is named like {list(targets)}")
    return found


def attach(model: nn.Module, lora: LoRA) -> LoRA:
    """Add ``lora`` to ``model`` unfused: each adapted module's output gains ``lora.scale`` × its LoRALayer's
    output. At scale 0 the layer is not run at all, so the model's output is the base model's, bit for bit."""
    if lora.attached:
        raise ValueError(f"LoRA {lora.name!r} is already attached")
    modules = dict(model.named_modules())
    missing = [key for key in lora.targets if key not in modules]
    if missing:
        raise ValueError(f"LoRA {lora.name!r} adapts modules {type(model).__name__} does not have: {missing[:5]}")
    for key, layer in lora.items():
        lora._handles.append(modules[key].register_forward_hook(_hook(lora, layer)))
    lora._model = weakref.ref(model)
    return lora


def _hook(lora: LoRA, layer: LoRALayer):
    def add_update(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if lora.scale == 0 or lora.fused:
            return output
        x = inputs[0]
        delta = layer(x.to(layer.down.weight.dtype))
        return output + (lora.scale * delta).to(output.dtype)
    return add_update


def detach(lora: LoRA) -> None:
    """Take ``lora`` off the model it was attached to (unfusing first if it is fused)."""
    if lora.fused:
        unfuse(lora)
    for handle in lora._handles:
        handle.remove()
    lora._handles, lora._model = [], None


# Fused LoRAs per model, in the order they were fused, with the weights each one replaced.
_FUSED: "weakref.WeakKeyDictionary[nn.Module, list[tuple[LoRA, dict[str, torch.Tensor]]]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def fuse(lora: LoRA) -> None:
    """W ← W + s·ΔW for every adapted module of the attached ``lora`` (computed in float32, stored in W's dtype):
    the model then runs at the base model's speed. Keeps a copy of each replaced W for ``unfuse``."""
    model = lora._model() if lora._model else None
    if model is None:
        raise ValueError(f"LoRA {lora.name!r} is not attached to a model; attach it before fusing")
    if lora.fused:
        return
    modules, saved = dict(model.named_modules()), {}
    for key, layer in lora.items():
        weight = modules[key].weight
        saved[key] = weight.detach().clone()
        delta = layer.delta_weight().float().reshape(weight.shape).to(weight.device)
        weight.copy_((weight.float() + lora.scale * delta).to(weight.dtype))
    _FUSED.setdefault(model, []).append((lora, saved))
    lora.fused = True


@torch.no_grad()
def unfuse(lora: LoRA) -> None:
    """Put back the exact weights ``fuse`` replaced. LoRAs fused on top of this one are unfused first and
    fused again after, so the result is the same as if this one had never been fused."""
    model = lora._model() if lora._model else None
    stack = _FUSED.get(model, []) if model is not None else []
    position = next((i for i, (other, _) in enumerate(stack) if other is lora), None)
    if position is None:
        return
    later = [other for other, _ in stack[position + 1:]]
    modules = dict(model.named_modules())
    for other, saved in reversed(stack[position:]):
        for key, weight in saved.items():
            modules[key].weight.copy_(weight)
        other.fused = False
    del stack[position:]
    for other in later:
        fuse(other)


def delta_singular_values(layer: LoRALayer) -> torch.Tensor:
    """The singular values of ΔW (a conv's flattened to d_out × d_in·k·k): at most r are non-zero."""
    return torch.linalg.svdvals(layer.delta_weight().detach().float().flatten(1))


__all__ = ["ATTENTION", "CONV", "LoRA", "LoRALayer", "TARGETS", "TRANSFORMER", "attach", "delta_singular_values",
           "detach", "fuse", "target_modules", "unfuse"]
