"""A trained pixel-space diffusion model put together for use: UNet + schedule + prediction type.

Composes the pieces; the math lives in ``diffusion``, ``samplers`` and ``unet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_weights, safe_load
from .config import from_dict, load_json
from .diffusion import q_sample
from .samplers import StepRecord, classifier_free_guidance, get_sampler, randn
from .schedule import NoiseSchedule
from .train import CHECKPOINT, CONFIG, TrainConfig
from .unet import UNet


@dataclass
class PixelDiffusion:
    unet: UNet
    schedule: NoiseSchedule
    config: TrainConfig

    @classmethod
    def from_run(cls, path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> "PixelDiffusion":
        """Load a run directory (``config.json`` + ``checkpoint.pt``) or a checkpoint file.

        ``ema=True`` (the default) takes the EMA weights, which sample better.
        """
        path = Path(path)
        if path.is_dir():
            if not (path / CHECKPOINT).exists():
                raise CheckpointError(f"{path} has no {CHECKPOINT}: is it a run directory from `ldm train`?")
            state = safe_load(path / CHECKPOINT)
            config = load_json(TrainConfig, path / CONFIG) if (path / CONFIG).exists() else from_dict(TrainConfig, state["config"])
        else:
            state = safe_load(path)
            if not isinstance(state, dict) or "config" not in state:
                raise CheckpointError(f"{path} is not an ldm training checkpoint (no 'config' entry)")
            config = from_dict(TrainConfig, state["config"])
        unet = UNet(config.unet)
        weights = state["ema"]["model"] if ema else state["model"]
        load_weights(unet, weights, source=f"{path} ({'EMA' if ema else 'raw'} weights)")
        return cls(unet.to(device).eval(), NoiseSchedule(config.schedule), config)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def denoiser(self, labels: torch.Tensor | None = None, guidance: float = 1.0):
        """The callable the samplers run: the UNet, class-guided when ``guidance`` ≠ 1."""
        num_classes = self.config.unet.num_classes
        if labels is not None and num_classes is None:
            raise ValueError("this model is unconditional: it takes no class label (train with --class-conditional)")
        if guidance != 1.0:
            if num_classes is None:
                raise ValueError("classifier-free guidance needs a class-conditional model")
            return classifier_free_guidance(self.unet, guidance, torch.tensor([num_classes], device=self.device))
        return self.unet

    def labels(self, n: int, class_label: int | Sequence[int] | None) -> torch.Tensor | None:
        num_classes = self.config.unet.num_classes
        if class_label is None:
            return None
        if num_classes is None:
            raise ValueError("this model is unconditional: --class needs a model trained with --class-conditional")
        labels = torch.as_tensor(class_label, dtype=torch.long).reshape(-1).expand(n) if isinstance(class_label, int) \
            else torch.as_tensor(class_label, dtype=torch.long)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class {labels.tolist()} out of range: this model knows classes 0 … {num_classes - 1}")
        return labels.to(self.device)

    def shape(self, n: int) -> tuple[int, int, int, int]:
        u = self.config.unet
        return (n, u.in_channels, u.sample_size, u.sample_size)

    def loop(self, n: int, *, sampler: str = "ddim", num_inference_steps: int = 50, seed: int = 0,
             class_label: int | Sequence[int] | None = None, guidance: float = 1.0, **options) -> Iterator[StepRecord]:
        """The reverse process as a generator of per-step records (see ``ldm.samplers``)."""
        labels = self.labels(n, class_label)
        g = torch.Generator().manual_seed(seed)
        x_T = randn(self.shape(n), g, self.device)
        return get_sampler(sampler)(self.denoiser(labels, guidance), self.schedule, x_T, num_inference_steps=num_inference_steps,
                                    prediction=self.config.prediction, cond=labels, generator=g, **options)

    @torch.inference_mode()
    def __call__(self, n: int, *, num_inference_steps: int = 50, progress: bool = True, **options) -> torch.Tensor:
        """n samples in [−1, 1], (n, C, H, W): ``loop`` run to the end. The same seed and n give the same samples."""
        record = None
        for record in tqdm(self.loop(n, num_inference_steps=num_inference_steps, **options), total=num_inference_steps,
                           disable=not progress, desc="sample"):
            pass
        return record.x_prev


def forward_strip(schedule: NoiseSchedule, images: torch.Tensor, timesteps: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The forward process on given images: x_t at each requested t, one fixed ε per image,
    so a strip shows the same noise growing. Shapes: images (N, C, H, W) in [−1, 1] →
    (N · K, C, H, W) for K timesteps, image-major."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    rows = []
    for x0, eps in zip(images, noise):
        k = len(timesteps)
        t = torch.as_tensor(list(timesteps), dtype=torch.long)
        rows.append(q_sample(schedule, x0.expand(k, *x0.shape), t, eps.expand(k, *eps.shape)))
    return torch.cat(rows)
