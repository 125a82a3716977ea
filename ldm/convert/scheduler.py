"""Diffusers scheduler configs ↔ ldm's ``SamplingConfig`` (schedule and sampler settings)."""

from __future__ import annotations

from typing import Any

from ..sampling import SamplingConfig
from ..schedule import ScheduleConfig

# diffusers' names ↔ ldm's: β schedules, predictions, and DDPM variances (fixed_small_log: the same σ_t, taken through a log)
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
CLIPPING_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
# LCMScheduler's settings of its own: ldm's ``lcm`` sampler has them as defaults (its plan and boundary scalings)
LCM_DEFAULTS = {"original_inference_steps": 50, "timestep_scaling": 10.0}


def sampling_from_diffusers(cfg: dict[str, Any]) -> SamplingConfig:
    """A diffusers ``scheduler_config.json`` → ``SamplingConfig``.

    Absent keys take ``DDPMScheduler``'s defaults (linear β 1e-4 → 0.02 over T = 1000, ε, clip_sample true for
    DDPM/DDIM schedulers and false for the others, fixed_small, no steps_offset, set_alpha_to_one true); an absent ``timestep_spacing`` stays None: each sampler's
    own default. "fixed_small_log" is the same variance as "fixed_small". Trained betas, learned variances, dynamic
    thresholding and a clip range other than 1 are refused by name: ldm would sample something else. An
    ``LCMScheduler`` (an LCM folder: "leading", steps_offset 1, no clipping) reads as any other; its own
    original_inference_steps and timestep_scaling must be the ``lcm`` sampler's (50, 10), which ldm keeps there.
    """
    beta = cfg.get("beta_schedule", "linear")
    if beta not in BETA_SCHEDULES or cfg.get("trained_betas") is not None:
        raise ValueError(f"scheduler beta_schedule {beta!r} is not supported (known: {', '.join(BETA_SCHEDULES)})")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"scheduler prediction_type {prediction!r} is not supported (known: {', '.join(PREDICTIONS)})")
    variance = cfg.get("variance_type") or "fixed_small"
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"scheduler variance_type {variance!r} is not supported (known: {', '.join(DDPM_VARIANCES)})")
    if cfg.get("thresholding"):
        raise ValueError("scheduler thresholding=true (dynamic thresholding) is not supported")
    for option, default in LCM_DEFAULTS.items():
        if cfg.get(option) is not None and cfg[option] != default:
            raise ValueError(f"scheduler {option}={cfg[option]!r} is not supported (ldm's lcm sampler: {default})")
    # only DDPM and DDIM schedulers clip x̂_0, by default; the others (PNDM, Euler, DPM-Solver …) have no such option
    clip = bool(cfg.get("clip_sample", cfg.get("_class_name", "DDPMScheduler") in CLIPPING_SCHEDULERS))
    if clip and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(f"scheduler clip_sample_range={cfg['clip_sample_range']} is not supported (x̂_0 is clipped to [-1, 1])")
    schedule = ScheduleConfig(kind=BETA_SCHEDULES[beta], num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                              beta_start=cfg.get("beta_start", 0.0001), beta_end=cfg.get("beta_end", 0.02),
                              zero_terminal_snr=cfg.get("rescale_betas_zero_snr", False))
    return SamplingConfig(schedule=schedule, prediction=PREDICTIONS[prediction], clip_x0=clip,
                          variance=DDPM_VARIANCES[variance], spacing=cfg.get("timestep_spacing"),
                          steps_offset=cfg.get("steps_offset", 0), set_alpha_to_one=cfg.get("set_alpha_to_one", True))


def sampling_to_diffusers(sampling: SamplingConfig, class_name: str = "DDIMScheduler") -> dict[str, Any]:
    """The inverse of ``sampling_from_diffusers``: a ``scheduler_config.json`` that reads back to ``sampling``."""
    s = sampling.schedule
    cfg = {"_class_name": class_name, "num_train_timesteps": s.num_train_timesteps,
           "beta_schedule": {v: k for k, v in BETA_SCHEDULES.items()}[s.kind], "beta_start": s.beta_start,
           "beta_end": s.beta_end, "prediction_type": {v: k for k, v in PREDICTIONS.items()}[sampling.prediction],
           "steps_offset": sampling.steps_offset, "set_alpha_to_one": sampling.set_alpha_to_one,
           "clip_sample": sampling.clip_x0, "rescale_betas_zero_snr": s.zero_terminal_snr}
    if sampling.variance != "fixed_small":  # DDPMScheduler's default; other scheduler classes have no such key
        cfg["variance_type"] = sampling.variance
    if sampling.spacing is not None:  # absent: each scheduler class's own default, as when it was read
        cfg["timestep_spacing"] = sampling.spacing
    return cfg
