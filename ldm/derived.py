"""Tensors computed from a module's weights (Winograd filters, stacked projections), cached until the weights change.

Fast inference paths want the weights in another form than the checkpoint stores. The checkpoint form stays
the module's parameters (state-dict keys, converters and training see no change); the derived form is built
on first use and kept beside them. It is rebuilt when any source tensor is replaced (``.to()``, ``assign``
loads), changes dtype or device, or is written in place (optimizer steps, ``load_state_dict``, EMA), which
PyTorch's per-tensor version counter records. Owners subclass ``CachesDerived``, which also drops the cache
on ``.to()`` (freeing the old copy at once) and ``load_state_dict``. Weights created under ``inference_mode``
have no version counter: write into such weights other than through ``load_state_dict``, and call
``clear(model)`` after.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def _key(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t.dtype, t.device, None if t.is_inference() else t._version) for t in tensors)


def derived(owner: nn.Module, name: str, sources: Sequence[torch.Tensor],
            build: Callable[..., torch.Tensor | tuple]) -> torch.Tensor | tuple:
    """``build(*sources)``, cached on ``owner`` under ``name`` while ``sources`` are unchanged."""
    cache = owner.__dict__.setdefault("_derived", {})
    key = _key(sources)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[name] = (key, build(*sources))
    return hit[1]


def clear(model: nn.Module) -> None:
    """Drop every cached derived tensor in ``model`` (frees their memory; they are rebuilt on next use)."""
    for module in model.modules():
        module.__dict__.pop("_derived", None)


def wants_grad(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd records this call: then the plain layers run, as training needs their exact graph."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


class CachesDerived(nn.Module):
    """Base for modules that keep ``derived`` tensors: moving, casting or loading the module drops them."""

    def _apply(self, fn, recurse=True):
        clear(self)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_derived", None)  # children get their own call
        super()._load_from_state_dict(*args, **kwargs)
