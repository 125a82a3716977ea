"""Reverse-process samplers. Each is a generator over any ``model(x_t, t, cond)``; ``sample`` runs one to the end."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..schedule import NoiseSchedule, Spacing
from .common import StepRecord, randn, run_to_end
from .ddim import ddim
from .ddpm import ddpm
from .dpm_solver import dpm_solver_sigma_steps, dpm_solver_timesteps, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from .dpm_sde import dpmpp_sde
from .euler import euler, euler_ancestral, euler_timesteps, sigma_steps, sigmas_at
from .guidance import classifier_free_guidance
from .heun import heun
from .lcm import lcm, lcm_timesteps
from .lms import lms
from .sigmas import SIGMA_SCHEDULES, SigmaSchedule

SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpm++2m": dpmpp_2m, "euler": euler, "euler_a": euler_ancestral,
            "dpm++2m_sde": dpmpp_2m_sde, "dpm++3m": dpmpp_3m, "dpm++sde": dpmpp_sde,
            "heun": heun, "lms": lms, "lcm": lcm}
# The spacing each sampler's diffusers scheduler class uses when a config does not say (SD 1.5's does not).
DEFAULT_SPACING: dict[str, Spacing] = {"ddpm": "leading", "ddim": "leading", "dpm++2m": "linspace", "euler": "linspace",
                                       "euler_a": "linspace", "dpm++2m_sde": "linspace", "dpm++3m": "linspace",
                                       "dpm++sde": "linspace", "heun": "linspace", "lms": "linspace",
                                       "lcm": "leading"}  # LCMScheduler's; its own plan (lcm_timesteps) ignores it
# The samplers built on DPM-Solver's plan (``dpm_solver_timesteps``, ``dpm_solver_sigma_steps``).
DPM_SOLVERS = ("dpm++2m", "dpm++2m_sde", "dpm++3m")
# The samplers that step in σ and so take a σ schedule (``sigmas=``): DPM-Solver's, the Euler family and DPM++ SDE.
SIGMA_SAMPLERS = ("dpm++2m", "dpm++2m_sde", "dpm++3m", "dpm++sde", "euler", "euler_a", "heun", "lms")
# The names common UIs (A1111, ComfyUI, diffusers' docs) give them: (sampler, σ schedule).
ALIASES: dict[str, tuple[str, SigmaSchedule | None]] = {
    "Euler": ("euler", None), "Euler a": ("euler_a", None), "DPM++ 2M": ("dpm++2m", None),
    "DPM++ 2M Karras": ("dpm++2m", "karras"), "DPM++ 2M SDE": ("dpm++2m_sde", None),
    "DPM++ 2M SDE Karras": ("dpm++2m_sde", "karras"),
    "DPM++ 3M": ("dpm++3m", None), "DPM++ 3M Karras": ("dpm++3m", "karras"),
    "DPM++ SDE": ("dpm++sde", None), "DPM++ SDE Karras": ("dpm++sde", "karras"), "Heun": ("heun", None),
    "LMS": ("lms", None), "LMS Karras": ("lms", "karras"), "DDIM": ("ddim", None), "LCM": ("lcm", None),
}
SAMPLER_NAMES = (*SAMPLERS, *ALIASES)


def resolve_sampler(name: str, sigmas: SigmaSchedule | None = None) -> tuple[str, SigmaSchedule | None]:
    """(the sampler's key in ``SAMPLERS``, its σ schedule) for a key or a UI name ("DPM++ 2M Karras" →
    ("dpm++2m", "karras")); ``sigmas`` asks for a schedule explicitly and must agree with the name's."""
    by_lower = {alias.lower(): target for alias, target in ALIASES.items()}
    if name in SAMPLERS:
        key, implied = name, None
    elif name.lower() in by_lower:
        key, implied = by_lower[name.lower()]
    else:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}; or as UIs name them: "
                         f"{', '.join(ALIASES)}")
    if sigmas is not None and sigmas not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {sigmas!r}; known: {', '.join(SIGMA_SCHEDULES)}")
    if implied is not None and sigmas is not None and sigmas != implied:
        raise ValueError(f"sampler {name!r} means sigmas={implied!r}, but sigmas={sigmas!r} was asked for")
    sigmas = sigmas or implied
    if sigmas is not None and key not in SIGMA_SAMPLERS:
        raise ValueError(f"sampler {key!r} takes no sigma schedule; those that do: {', '.join(SIGMA_SAMPLERS)}")
    return key, sigmas


def get_sampler(name: str, sigmas: SigmaSchedule | None = None):
    """The sampler loop for a key or a UI name, with its σ schedule bound ("LMS Karras": ``lms``, karras)."""
    key, sigmas = resolve_sampler(name, sigmas)
    return SAMPLERS[key] if sigmas is None else partial(SAMPLERS[key], sigmas=sigmas)


def sampler_timesteps(name: str, schedule: NoiseSchedule, num_inference_steps: int, spacing: Spacing = "leading",
                      steps_offset: int = 0, sigmas: SigmaSchedule | None = None) -> torch.Tensor:
    """The timesteps the named sampler visits by default, decreasing: what to slice for img2img.

    They differ by sampler as diffusers' schedulers do: DPM-Solver splits [0, T) into S + 1 points
    ("leading" steps by ⌊T/(S+1)⌋), Euler, Heun and LMS leave "linspace" unrounded; DDIM and DDPM use
    ``schedule.timesteps``; LCM, S evenly spaced steps of its 50-step distillation schedule (``lcm_timesteps``,
    whatever the spacing). With a σ schedule (named, or implied by a UI name), the timesteps of its σ's
    (fractional for the Euler family; ``sigma_steps``, ``dpm_solver_sigma_steps``). Heun's are its S outer steps.
    """
    key, sigmas = resolve_sampler(name, sigmas)
    if key in DPM_SOLVERS:
        if sigmas is not None:
            return dpm_solver_sigma_steps(schedule, num_inference_steps, sigmas)[0]
        return dpm_solver_timesteps(schedule, num_inference_steps, spacing, steps_offset)
    if key in SIGMA_SAMPLERS:
        return sigma_steps(schedule, num_inference_steps, spacing, steps_offset, sigmas=sigmas)[0]
    if key == "lcm":
        return lcm_timesteps(schedule.num_train_timesteps, num_inference_steps)
    return schedule.timesteps(num_inference_steps, spacing, steps_offset)


def sampler_sigmas(name: str, schedule: NoiseSchedule, num_inference_steps: int, spacing: Spacing = "leading",
                   steps_offset: int = 0, sigmas: SigmaSchedule | None = None) -> torch.Tensor:
    """σ = √((1 − ᾱ)/ᾱ) at each of the S steps the named sampler visits by default (float64, decreasing): the noise
    levels image-to-image noises x_0 to (x_t = √ᾱ x_0 + √(1 − ᾱ) ε with ᾱ = 1/(1 + σ²), diffusers' ``add_noise``
    for its σ-space and DPM-Solver schedulers alike). Without a σ schedule, σ at ``sampler_timesteps``."""
    key, sigmas = resolve_sampler(name, sigmas)
    if sigmas is None:
        return sigmas_at(schedule, sampler_timesteps(key, schedule, num_inference_steps, spacing, steps_offset))
    if key in DPM_SOLVERS:
        return dpm_solver_sigma_steps(schedule, num_inference_steps, sigmas)[1]
    return sigma_steps(schedule, num_inference_steps, spacing, steps_offset, sigmas=sigmas)[1][:-1]


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

    ``sampler`` is a key of ``SAMPLERS`` or a UI name ("DPM++ 2M Karras"); ``options`` go to the sampler
    (num_inference_steps, eta, prediction, cond, sigmas, …).
    Returns x_0, shape ``shape``.
    """
    loop = get_sampler(sampler, options.pop("sigmas", None))
    x = randn(shape, generator, device) if x_T is None else x_T
    if options.get("timesteps") is not None:
        steps = len(options["timesteps"])
    else:  # each sampler's own default: all T steps for ddpm, 4 for lcm, 50 for the others
        default = {"ddpm": schedule.num_train_timesteps, "lcm": 4}.get(resolve_sampler(sampler)[0], 50)
        steps = options.get("num_inference_steps") or default
    return run_to_end(loop(model, schedule, x, generator=generator, **options), steps, progress, sampler).x_prev


__all__ = [
    "ALIASES", "DEFAULT_SPACING", "DPM_SOLVERS", "SAMPLERS", "SAMPLER_NAMES", "SIGMA_SAMPLERS", "SIGMA_SCHEDULES",
    "StepRecord", "classifier_free_guidance", "ddim", "ddpm", "dpm_solver_sigma_steps", "dpm_solver_timesteps",
    "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "dpmpp_sde", "euler", "euler_ancestral", "euler_timesteps", "get_sampler",
    "heun", "lcm", "lcm_timesteps", "lms", "randn", "resolve_sampler", "run_to_end", "sample", "sampler_sigmas",
    "sampler_timesteps", "sigma_steps",
]
