"""Diffusers scheduler configs ↔ ldm's schedule and sampler settings."""

from __future__ import annotations

from typing import Any

from ..schedule import ScheduleConfig


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
