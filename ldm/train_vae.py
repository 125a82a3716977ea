"""Training the autoencoder of latent diffusion: reconstruction + β·KL (+ an optional patch-GAN).

    L = ‖x − D(z)‖₁ (or ₂)  +  β · KL(q(z|x) ‖ N(0, I)) / (C·H·W)  [+ λ · L_adv after ``disc_start``]
                                                       [Rombach et al. 2022, §3; Esser et al. 2021, Eq. 5]
The KL is divided by the number of pixels so that β does not depend on image size.
When training ends the latent scale factor 1/std(z) is measured on training images and
stored in the saved ``VAEConfig`` [Rombach et al. 2022, App. G]; held-out PSNR goes to
``metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import atomic_save_json
from .data import ImageDataset, load_dataset
from .images import save_strip
from .loop import LoopConfig, TrainLoop, with_fields
from .vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class VAETrainConfig:
    vae: VAEConfig = field(default_factory=VAEConfig.mnist)
    image_size: int = 32
    dataset: str = "mnist-bundled"
    data_dir: str | None = None
    holdout: int = 500  # the last images of the dataset, never trained on, for PSNR
    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-4
    disc_start: int | None = None  # step from which the patch-GAN term is on; None = never
    disc_weight: float = 0.1
    sample_n: int = 16
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be l1 or l2, got {self.reconstruction!r}")
        if self.image_size % self.vae.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE's downsampling factor "
                             f"{self.vae.downsample_factor}")

    def with_(self, **changes) -> "VAETrainConfig":
        return with_fields(self, **changes)

    @classmethod
    def mnist(cls) -> "VAETrainConfig":
        """32×32 digits → 2×8×8 latents."""
        return cls(vae=VAEConfig.mnist(), image_size=32, kl_weight=1e-3,
                   loop=LoopConfig(batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, sample_every=500,
                                   mixed_precision="auto"))

    @classmethod
    def cifar10(cls) -> "VAETrainConfig":
        return cls(vae=VAEConfig.cifar10(), image_size=32, dataset="cifar10", disc_start=5000,
                   loop=LoopConfig(batch_size=64, lr=5e-4, warmup_steps=500, ema_decay=0.999, sample_every=2000))


VAE_PRESETS = {"mnist": VAETrainConfig.mnist, "cifar10": VAETrainConfig.cifar10}


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided convolutions giving one real/fake logit per patch  [Isola et al. 2017]."""

    def __init__(self, in_channels: int, channels: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.GroupNorm(8, 2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        mods.append(nn.Conv2d(ch, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image for data in [−1, 1] (peak-to-peak 2): 10·log₁₀(2² / MSE)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


class VAETrainer(TrainLoop):
    model_fields = ("vae", "image_size")

    def __init__(self, config: VAETrainConfig, out_dir: str | Path, *, device: str | None = None,
                 dataset: ImageDataset | None = None, progress: bool = True):
        c = config
        if dataset is None:
            dataset = load_dataset(c.dataset, c.data_dir, image_size=c.image_size, channels=c.vae.in_channels)
        if dataset.image_size != c.image_size or dataset.channels != c.vae.in_channels:
            raise ValueError(f"dataset gives {dataset.channels}×{dataset.image_size}² images, the VAE config "
                             f"expects {c.vae.in_channels}×{c.image_size}²")
        if not 0 <= c.holdout < len(dataset):
            raise ValueError(f"holdout {c.holdout} must be smaller than the dataset ({len(dataset)} images)")
        n_train = len(dataset) - c.holdout
        self.held_out = ImageDataset(dataset.images[n_train:], None, None, name="held-out")
        train_set = ImageDataset(dataset.images[:n_train], dataset.labels[:n_train] if dataset.labels is not None else None,
                                 dataset.num_classes, hflip=dataset.hflip, name=dataset.name)
        super().__init__(config, out_dir, train_set, device=device, progress=progress)
        self.setup_model(AutoencoderKL(c.vae))
        self.discriminator = self.disc_optimizer = None
        if c.disc_start is not None:
            if self.distributed:
                raise ValueError("the patch-GAN term (disc_start) is single-process only; unset it for torchrun")
            self.discriminator = PatchDiscriminator(c.vae.in_channels).to(self.device)
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=c.loop.lr, betas=(0.5, 0.9))

    def model_signature(self, config: VAETrainConfig) -> dict:
        # the scaling factor is measured at the end of training, so a finished run may have another one
        return {"vae": config.vae.with_(scaling_factor=1.0), "image_size": config.image_size}

    def loss(self) -> torch.Tensor:
        c = self.config
        x, _ = self.batch()
        x_hat, posterior = self.ddp_model(x, self.generator)
        rec = (x_hat - x).abs().mean() if c.reconstruction == "l1" else (x_hat - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + c.kl_weight * kl
        if self.discriminator is not None and self.step >= c.disc_start:
            self._discriminator_step(x, x_hat.detach())
            loss = loss - c.disc_weight * self.discriminator(x_hat).mean()  # generator's hinge term
        return loss

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """Hinge loss  ½·E[relu(1 − D(x))] + ½·E[relu(1 + D(x̂))]  [Lim & Ye 2017], one AdamW step."""
        d_loss = 0.5 * (F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake)).mean())
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_optimizer.step()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """Reconstruct with the EMA weights through the posterior mean (a progress bar when ``desc`` is given)."""
        vae = self.ema.model
        parts = tqdm(images.split(256), desc=desc, disable=desc is None or not self.progress, leave=False)
        return torch.cat([vae.decode(vae.encode(part.to(self.device)).mode()).cpu() for part in parts])

    @torch.no_grad()
    def held_out_psnr(self) -> float:
        x, _ = self.held_out.batch(torch.arange(len(self.held_out)))
        return psnr(self.reconstruct(x, "held-out PSNR"), x).mean().item()

    @torch.no_grad()
    def latent_std(self, n: int = 2000) -> float:
        """std of sampled latents z ~ q(z | x) over training images; 1/std is the scaling factor."""
        vae = self.ema.model
        x, _ = self.data.batch(torch.arange(min(n, len(self.data))))
        g = torch.Generator().manual_seed(0)
        parts = tqdm(x.split(256), desc="latent scale", disable=not self.progress, leave=False)
        z = torch.cat([vae.encode(part.to(self.device)).sample(g).cpu() for part in parts])
        return z.float().std().item()

    def save_samples(self, path: Path, progress: bool = False) -> None:
        x, _ = self.held_out.batch(torch.arange(min(self.config.sample_n, len(self.held_out))))
        recon = self.reconstruct(x, "reconstructions" if progress else None)
        save_strip([x, recon], path, scale=3)  # top: held-out images, bottom: reconstructions

    def train(self, overwrite: bool = False) -> Path:
        out = super().train(overwrite)
        if self.rank == 0:
            scale = 1.0 / self.latent_std()
            self.config = self.config.with_(vae=self.config.vae.with_(scaling_factor=scale))
            self.save()
            metrics = {"step": self.step, "held_out_psnr_db": self.held_out_psnr(), "scaling_factor": scale,
                       "held_out_images": len(self.held_out)}
            atomic_save_json(metrics, self.out_dir / "metrics.json")
        return out


def train_vae(config: VAETrainConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
              device: str | None = None, progress: bool = True) -> VAETrainer:
    """Build a ``VAETrainer`` and train to the budget: a fresh run, or with ``resume`` the run in ``out_dir``
    continued, or with ``overwrite`` that run started over (an existing run is refused without one of them)."""
    return VAETrainer(config, out_dir, device=device, progress=progress).fit(resume, overwrite)
