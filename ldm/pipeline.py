"""A trained diffusion model put together for use: UNet + schedule + prediction type (+ VAE for latent models).

Composes the pieces; the math lives in ``diffusion``, ``samplers``, ``unet`` and ``vae``.
Everything the samplers see is in "model space" (pixels in [−1, 1], or scaled latents);
``encode``/``decode`` cross between it and images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import load_weights
from .diffusion import q_sample
from .latent import check_vae_matches, load_vae
from .loop import read_run
from .samplers import StepRecord, classifier_free_guidance, get_sampler, randn
from .schedule import NoiseSchedule
from .train import TrainConfig
from .unet import UNet
from .vae import AutoencoderKL

Labels = int | Sequence[int] | torch.Tensor | None


@dataclass
class DiffusionPipeline:
    unet: UNet
    schedule: NoiseSchedule
    config: TrainConfig
    vae: AutoencoderKL | None = None

    @classmethod
    def from_run(cls, path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu",
                 vae: str | Path | None = None) -> "DiffusionPipeline":
        """Load a run directory (``config.json`` + ``checkpoint.pt``) or a checkpoint file.

        ``ema=True`` (the default) takes the EMA weights, which sample better. A latent model
        loads the VAE it was trained with (or ``vae``, checked to have the same latent shape and scale).
        """
        state, config = read_run(path, TrainConfig, "unet", "ldm train")
        unet = UNet(config.unet)
        load_weights(unet, state["ema"]["model"] if ema else state["model"], source=f"{path} ({'EMA' if ema else 'raw'} weights)")
        autoencoder = None
        if vae is not None or config.vae is not None:
            source = vae if vae is not None else config.vae
            autoencoder, _ = load_vae(source, device=device)
            check_vae_matches(config.vae_config, autoencoder, str(source))
        return cls(unet.to(device).eval(), NoiseSchedule(config.schedule), config, autoencoder)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # --- model space ↔ images --------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] → what the UNet denoises: the images themselves, or s · μ(x) for a latent model."""
        images = images.to(self.device)
        if self.vae is None:
            return images
        return self.vae.encode(images).mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``encode``: D(z / s) for a latent model."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor)

    # --- conditioning ------------------------------------------------------------------------
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

    def labels(self, n: int, class_label: Labels) -> torch.Tensor | None:
        num_classes = self.config.unet.num_classes
        if class_label is None:
            return None
        if num_classes is None:
            raise ValueError("this model is unconditional: --class needs a model trained with --class-conditional")
        labels = torch.as_tensor(class_label, dtype=torch.long).reshape(-1)
        labels = labels.expand(n) if labels.numel() == 1 else labels
        if labels.shape != (n,):
            raise ValueError(f"got {labels.numel()} class labels for {n} samples")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class {labels.tolist()} out of range: this model knows classes 0 … {num_classes - 1}")
        return labels.to(self.device)

    def shape(self, n: int) -> tuple[int, int, int, int]:
        u = self.config.unet
        return (n, u.in_channels, u.sample_size, u.sample_size)

    # --- sampling ------------------------------------------------------------------------------
    def loop(self, n: int, *, sampler: str = "ddim", num_inference_steps: int = 50, seed: int | torch.Generator = 0,
             class_label: Labels = None, guidance: float = 1.0, x_T: torch.Tensor | None = None,
             **options) -> Iterator[StepRecord]:
        """The reverse process for n samples, in model space, as a generator of per-step records.

        ``seed`` is an int or a CPU ``torch.Generator`` (x_T, unless given, and the sampler's noise
        come from it). ``options`` go to the sampler (``eta``, ``variance``, ``clip_x0``, ``timesteps`` …);
        x̂_0 is clipped to [−1, 1] when the run's config says ``clip_sample`` (pixel models).
        """
        labels = self.labels(n, class_label)
        g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        x_T = randn(self.shape(n), g, self.device) if x_T is None else x_T.to(self.device)
        options.setdefault("clip_x0", self.config.clip_sample)
        return get_sampler(sampler)(self.denoiser(labels, guidance), self.schedule, x_T, num_inference_steps=num_inference_steps,
                                    prediction=self.config.prediction, cond=labels, generator=g, **options)

    @torch.inference_mode()
    def __call__(self, n: int, *, num_inference_steps: int = 50, seed: int = 0, class_label: Labels = None,
                 batch_size: int = 128, progress: bool = True, **options) -> torch.Tensor:
        """n images in [−1, 1], (n, C, H, W): ``loop`` run to the end and decoded, ``batch_size`` samples
        at a time (one generator across batches: the same seed, n and batch_size give the same images)."""
        g = torch.Generator().manual_seed(seed)
        labels = self.labels(n, class_label)
        chunks = []
        with tqdm(total=num_inference_steps * -(-n // batch_size), disable=not progress, desc="sample") as bar:
            for start in range(0, n, batch_size):
                size = min(batch_size, n - start)
                part = None if labels is None else labels[start : start + size]
                for record in self.loop(size, num_inference_steps=num_inference_steps, seed=g, class_label=part, **options):
                    bar.update(1)
                chunks.append(self.decode(record.x_prev))
        return torch.cat(chunks)

    @torch.inference_mode()
    def img2img(self, images: torch.Tensor, strength: float, *, num_inference_steps: int = 50, seed: int = 0,
                class_label: Labels = None, **options) -> torch.Tensor:
        """SDEdit: noise the images to an intermediate t, then denoise from there  [Meng et al. 2022, §3].

        With S steps, the last ⌈strength·S⌉ of the sampler's timesteps are run, starting from
        x_t ~ q(x_t | x_0 = encode(images)) at the first of them. strength 0 returns the input
        (re-encoded), 1 ignores it. Shapes: images (B, C, H, W) in [−1, 1] → same.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        x0 = self.encode(images)
        run = round(strength * num_inference_steps)
        if run == 0:
            return self.decode(x0)
        timesteps = self.schedule.timesteps(num_inference_steps, options.pop("spacing", "leading"))[-run:]
        g = torch.Generator().manual_seed(seed)
        x_t = q_sample(self.schedule, x0, timesteps[:1].expand(len(x0)).to(x0.device), randn(x0.shape, g, x0.device))
        record = None
        for record in self.loop(len(x0), num_inference_steps=num_inference_steps, seed=g, class_label=class_label,
                                x_T=x_t, timesteps=timesteps, **options):
            pass
        return self.decode(record.x_prev)

    @torch.inference_mode()
    def interpolate(self, seed_a: int, seed_b: int, frames: int = 8, *, num_inference_steps: int = 50,
                    class_label: Labels = None, **options) -> torch.Tensor:
        """Samples along the spherical interpolation between two seeds' initial noises (deterministic DDIM).

        (frames, C, H, W): frame 0 is seed_a's sample, the last seed_b's.
        """
        x_a = randn(self.shape(1), torch.Generator().manual_seed(seed_a), self.device)
        x_b = randn(self.shape(1), torch.Generator().manual_seed(seed_b), self.device)
        x_T = torch.cat([slerp(x_a, x_b, w) for w in torch.linspace(0, 1, frames).tolist()])
        record = None
        for record in self.loop(frames, sampler="ddim", num_inference_steps=num_inference_steps, class_label=class_label,
                                x_T=x_T, eta=0.0, **options):
            pass
        return self.decode(record.x_prev)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation  sin((1−w)θ)/sin θ · a + sin(wθ)/sin θ · b,  cos θ = ⟨a, b⟩/(‖a‖‖b‖)
    [Shoemake 1985]: Gaussian noise keeps its norm (≈ √D) all along the path, unlike a straight line."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    if theta.abs() < 1e-4:
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)


def forward_strip(schedule: NoiseSchedule, images: torch.Tensor, timesteps: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The forward process on given images: x_t at each requested t, one fixed ε per image,
    so a strip shows the same noise growing. Shapes: images (N, C, H, W) in [−1, 1] →
    (N · K, C, H, W) for K timesteps, image-major."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    k = len(t)
    return torch.cat([q_sample(schedule, x0.expand(k, *x0.shape), t, eps.expand(k, *eps.shape)) for x0, eps in zip(images, noise)])
