"""Reverse-process samplers. Each is a generator over any ``model(x_t, t, cond)``; ``sample`` runs one to the end."""

from __future__ import annotations

from typing import Any

import torch

from ..schedule import NoiseSchedule, Spacing
from .common import StepRecord, randn, run_to_end
from .ddim import ddim
from .ddpm import ddpm
from .dpm_solver import dpm_solver_timesteps, dpmpp_2m
from .euler import euler, euler_ancestral, euler_timesteps
from .guidance import classifier_free_guidance

SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpm++2m": dpmpp_2m, "euler": euler, "euler_a": euler_ancestral}
# The spacing each sampler's diffusers scheduler class uses when a config does not say (SD 1.5's does not).
DEFAULT_SPACING: dict[str, Spacing] = {"ddpm": "leading", "ddim": "leading", "dpm++2m": "linspace", "euler": "linspace",
                                       "euler_a": "linspace"}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_timesteps(name: str, schedule: NoiseSchedule, num_inference_steps: int, spacing: Spacing = "leading",
                      steps_offset: int = 0) -> torch.Tensor:
    """The timesteps the named sampler visits by default, decreasing: what to slice for img2img.

    They differ by sampler as diffusers' schedulers do: DPM-Solver splits [0, T) into S + 1 points
    ("leading" steps by ⌊T/(S+1)⌋), Euler leaves "linspace" unrounded; DDIM and DDPM use ``schedule.timesteps``.
    """
    get_sampler(name)
    if name == "dpm++2m":
        return dpm_solver_timesteps(schedule, num_inference_steps, spacing, steps_offset)
    if name in ("euler", "euler_a"):
        return euler_timesteps(schedule, num_inference_steps, spacing, steps_offset)
    return schedule.timesteps(num_inference_steps, spacing, steps_offset)


def sample(
    model,
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
    if options.get("timesteps") is not None:
        steps = len(options["timesteps"])
    else:  # each sampler's own default: all T steps for ddpm, 50 for the others
        steps = options.get("num_inference_steps") or (schedule.num_train_timesteps if sampler == "ddpm" else 50)
    return run_to_end(loop(model, schedule, x, generator=generator, **options), steps, progress, sampler).x_prev


__all__ = [
    "DEFAULT_SPACING", "SAMPLERS", "StepRecord", "classifier_free_guidance", "ddim", "ddpm",
    "dpm_solver_timesteps", "dpmpp_2m", "euler", "euler_ancestral", "euler_timesteps", "get_sampler", "randn",
    "run_to_end", "sample", "sampler_timesteps",
]
