"""Reverse-process samplers. Each is a generator over any ``model(x_t, t, cond)``; ``sample`` runs one to the end."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..schedule import NoiseSchedule
from .common import Model, StepRecord, randn
from .ddim import ddim
from .ddpm import ddpm
from .guidance import classifier_free_guidance

SAMPLERS = {"ddpm": ddpm, "ddim": ddim}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    model: Model,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    progress: bool = True,
    **options: Any,
) -> torch.Tensor:
    """Draw x_T ~ N(0, I) from ``generator`` (on the CPU) and run the named sampler to the end.

    ``options`` go to the sampler (num_inference_steps, eta, prediction, cond, …).
    Returns x_0, shape ``shape``.
    """
    loop = get_sampler(name=sampler)
    x = randn(shape, generator, device) if x_T is None else x_T
    record = None
    steps = options.get("num_inference_steps") or (schedule.num_train_timesteps if sampler == "ddpm" else 50)
    for record in tqdm(loop(model, schedule, x, generator=generator, **options), total=steps, disable=not progress, desc=sampler):
        pass
    return record.x_prev


__all__ = ["SAMPLERS", "Model", "StepRecord", "classifier_free_guidance", "ddim", "ddpm", "get_sampler", "randn", "sample"]
