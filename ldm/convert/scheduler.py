"""Diffusers scheduler configs ↔ ldm's schedule and sampler settings."""

from __future__ import annotations

from typing import Any

from ..schedule import ScheduleConfig

# diffusers' variance_type → the ``variance`` of ldm's ddpm sampler (fixed_small_log: the same σ_t, taken through a log)
DDPM_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


def scheduler_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ``scheduler_config.json`` → keyword arguments: ``schedule`` (a ``ScheduleConfig``), ``prediction``,
    ``spacing`` (None when the file does not say: each sampler's default), ``steps_offset``, ``set_alpha_to_one``."""
    kinds = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    beta = cfg.get("beta_schedule", "linear")
    if beta not in kinds or cfg.get("trained_betas") is not None:
        raise ValueError(f"scheduler beta_schedule {beta!r} is not supported (known: {', '.join(kinds)})")
    predictions = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in predictions:
        raise ValueError(f"scheduler prediction_type {prediction!r} is not supported (known: {', '.join(predictions)})")
    return dict(
        schedule=ScheduleConfig(kind=kinds[beta], num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                beta_start=cfg.get("beta_start", 0.0001), beta_end=cfg.get("beta_end", 0.02),
                                zero_terminal_snr=cfg.get("rescale_betas_zero_snr", False)),
        prediction=predictions[prediction], spacing=cfg.get("timestep_spacing"),
        steps_offset=cfg.get("steps_offset", 0), set_alpha_to_one=cfg.get("set_alpha_to_one", True),
    )


def ddpm_sampling_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """The DDPM/DDIM scheduler settings beyond the schedule → ``clip_x0`` (clamp x̂_0 to [−1, 1] each step)
    and ``variance`` (DDPM's σ_t²: "fixed_small" β̃_t or "fixed_large" β_t  [Ho et al. 2020, §3.2]).

    Absent keys take ``DDPMScheduler``'s defaults (clip_sample true, fixed_small). "fixed_small_log" is the
    same variance (diffusers takes its square root through a log). Learned variances, dynamic thresholding
    and a clip range other than 1 are refused by name: ldm would sample something else.
    """
    variance = cfg.get("variance_type") or "fixed_small"
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"scheduler variance_type {variance!r} is not supported (known: {', '.join(DDPM_VARIANCES)})")
    if cfg.get("thresholding"):
        raise ValueError("scheduler thresholding=true (dynamic thresholding) is not supported")
    clip = bool(cfg.get("clip_sample", True))
    if clip and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(f"scheduler clip_sample_range={cfg['clip_sample_range']} is not supported (x̂_0 is clipped to [-1, 1])")
    return dict(clip_x0=clip, variance=DDPM_VARIANCES[variance])
