"""Training a diffusion model, on pixels or on a VAE's latents: the configuration, its presets, and the step.

One step: draw a batch x_0, t ~ U{0..T−1}, ε ~ N(0, I); minimise L_simple (``ldm.losses``)
with AdamW; update the EMA weights. The loop around it (budgets, checkpoints, exact resume,
DDP through ``torchrun``) is ``ldm.loop.TrainLoop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import ImageDataset, load_dataset
from .diffusion import PREDICTIONS, Prediction
from .images import save_grid
from .latent import LatentDataset, encode_dataset
from .loop import LoopConfig, TrainLoop, with_fields
from .losses import diffusion_loss
from .pipeline import DiffusionPipeline
from .runs import check_vae_matches, load_vae
from .samplers import sample
from .sampling import default_device
from .schedule import NoiseSchedule, ScheduleConfig
from .unet import UNet, UNetConfig
from .vae import VAEConfig


@dataclass(frozen=True)
class TrainConfig:
    unet: UNetConfig = field(default_factory=UNetConfig.mnist)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "eps"
    clip_sample: bool = True  # clamp x̂_0 to the data range [−1, 1] while sampling
    dataset: str = "mnist-bundled"
    data_dir: str | None = None
    class_conditional: bool = False
    class_dropout: float = 0.1  # probability of replacing a label by the null label (for CFG)
    min_snr_gamma: float | None = None
    vae: str | None = None  # a `ldm train-vae` run: train on its latents (latent diffusion)
    vae_config: VAEConfig | None = None  # that VAE's config, recorded so sampling can check the pairing
    sample_n: int = 64  # images in each sample grid
    sample_steps: int = DiffusionPipeline.default_steps  # sampler steps for the grids (the pipeline's sampler)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; known: {', '.join(PREDICTIONS)}")

    def with_(self, **changes) -> "TrainConfig":
        """Replace fields; loop fields (steps, lr, batch_size …) may be given directly."""
        return with_fields(self, **changes)

    @classmethod
    def mnist(cls) -> "TrainConfig":
        """The 20-minute CPU recipe for 28×28 digits (see README for how its numbers were chosen).

        Class-conditional: the label tells the model which digit it is drawing, so its capacity goes into
        strokes rather than into deciding the class; sampled with every class equally often and no guidance it
        still draws from p(x) = Σ_y p(y) p(x | y), with far better digits than the same model unconditional."""
        return cls(unet=UNetConfig.mnist(), schedule=ScheduleConfig.cosine(), min_snr_gamma=5.0, class_conditional=True,
                   loop=LoopConfig(batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999, mixed_precision="auto"))

    @classmethod
    def cifar10(cls) -> "TrainConfig":
        """The DDPM paper's CIFAR-10 setup  [Ho et al. 2020, App. B] (a GPU job: days on a CPU)."""
        return cls(unet=UNetConfig.ddpm_cifar10(), schedule=ScheduleConfig.ddpm(), dataset="cifar10",
                   loop=LoopConfig(batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                                   sample_every=10000, checkpoint_every=5000, mixed_precision="auto"))

    @classmethod
    def mnist_latent(cls) -> "TrainConfig":
        """Class-conditional latent diffusion on 2×8×8 MNIST latents (pair with `train-vae --preset mnist`)."""
        return cls(unet=UNetConfig.mnist_latent(), schedule=ScheduleConfig.cosine(), clip_sample=False,
                   class_conditional=True, sample_n=40,
                   loop=LoopConfig(batch_size=128, lr=1e-3, warmup_steps=200, ema_decay=0.999, mixed_precision="auto"))


PRESETS = {"mnist": TrainConfig.mnist, "cifar10": TrainConfig.cifar10, "mnist-latent": TrainConfig.mnist_latent}
# Why a preset is what it is on this CPU, for the line `ldm train` prints at start (README, "MNIST recipe").
PRESET_REASONS = {
    "mnist": "class labels because they buy far better digits at no cost in speed, even sampled without guidance; "
             "the same model and batch on every CPU, only the precision follows it: with fp32 (no native bf16) "
             "batch 32 makes 1.8× the steps of batch 64 and samples no better in the same time",
    "mnist-latent": "the same model and batch on every CPU, only the precision follows it",
}


def describe_config(config: TrainConfig) -> str:
    """One line: what is trained and how (model size, batch, learning rate, objective, EMA)."""
    u, loop = config.unet, config.loop
    with torch.device("meta"):  # shapes only: no memory, no initialisation (the trainer builds the real one)
        params = sum(p.numel() for p in UNet(u).parameters()) / 1e6
    weighting = f", min-SNR-{config.min_snr_gamma:g} weighting" if config.min_snr_gamma else ""
    labels = f", class-conditional ({config.class_dropout:.0%} label dropout)" if config.class_conditional else ""
    return (f"UNet {u.channels} channels × {','.join(map(str, u.channel_mult))} ({params:.2f} M parameters){labels}, "
            f"batch {loop.batch_size}, lr {loop.lr:g}, {config.prediction}-prediction{weighting}, "
            f"EMA γ {loop.ema_gamma:g} (≤ {loop.ema_decay:g})")


class Trainer(TrainLoop):
    """Trains a ``UNet`` on L_simple, on pixels or, with ``config.vae``, on a VAE's cached latents;
    ``ldm.loop.TrainLoop`` runs the loop, budgets and checkpoints."""

    model_fields = ("unet", "schedule", "prediction", "vae_config")

    def __init__(self, config: TrainConfig, out_dir: str | Path, *, device: str | None = None,
                 dataset: ImageDataset | LatentDataset | None = None, progress: bool = True):
        u = config.unet
        self.vae = None
        if config.vae is not None:
            self.vae, image_size = load_vae(config.vae, device=device or default_device())
            check_vae_matches(config.vae_config, self.vae, str(config.vae))
            config = config.with_(vae=str(Path(config.vae).resolve()), vae_config=self.vae.config)
            if dataset is None:
                images = load_dataset(config.dataset, config.data_dir, image_size=image_size,
                                      channels=self.vae.config.in_channels)
                device = next(self.vae.parameters()).device
                dataset = encode_dataset(self.vae, images, device=device, progress=progress)
        elif dataset is None:
            dataset = load_dataset(config.dataset, config.data_dir, image_size=u.sample_size, channels=u.in_channels)
        if dataset.image_size != u.sample_size or dataset.channels != u.in_channels:
            kind = "latents" if self.vae is not None else "images"
            hint = " (a latent-space UNet: give --vae VAE_RUN_DIR from `ldm train-vae`)" if self.vae is None else ""
            raise ValueError(f"dataset {dataset.name or config.dataset} gives {dataset.channels}×{dataset.image_size}² "
                             f"{kind}, the UNet expects {u.in_channels}×{u.sample_size}²{hint}")
        if config.class_conditional and u.num_classes is None:
            if dataset.num_classes is None:
                raise ValueError(f"a class-conditional model needs a labelled dataset; {config.dataset} has no labels "
                                 "(--class-conditional false trains an unconditional one)")
            config = config.with_(unet=u.with_(num_classes=dataset.num_classes))
        super().__init__(config, out_dir, dataset, device=device, progress=progress)
        self.schedule = NoiseSchedule(config.schedule)
        self.setup_model(UNet(config.unet))

    def loss(self) -> torch.Tensor:
        x0, labels = self.batch()
        num_classes = self.config.unet.num_classes
        if num_classes is None:
            labels = None
        elif labels is not None:  # label dropout: the null label teaches the unconditional model (for CFG)
            drop = torch.rand(labels.shape, generator=self.generator) < self.config.class_dropout
            labels = torch.where(drop.to(labels.device), torch.full_like(labels, num_classes), labels)
        return diffusion_loss(self.ddp_model, self.schedule, x0, prediction=self.config.prediction, cond=labels,
                              generator=self.generator, min_snr_gamma=self.config.min_snr_gamma).mean()

    @torch.no_grad()
    def save_samples(self, path: Path, progress: bool = False) -> None:
        c, u = self.config, self.config.unet
        if not c.sample_n:
            return
        cond = torch.arange(c.sample_n, device=self.device) % u.num_classes if u.num_classes else None  # a column per class
        x = sample(self.ema.model, self.schedule, (c.sample_n, u.in_channels, u.sample_size, u.sample_size),
                   sampler=DiffusionPipeline.default_sampler, num_inference_steps=c.sample_steps,
                   prediction=c.prediction, cond=cond,
                   clip_x0=c.clip_sample, generator=torch.Generator().manual_seed(c.loop.seed), device=self.device,
                   progress=progress)
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor)
        save_grid(x, path, nrow=u.num_classes or None, scale=2)


def train_diffusion(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                    device: str | None = None, progress: bool = True) -> Trainer:
    """Build a ``Trainer`` and train to the budget: a fresh run, or with ``resume`` the run in ``out_dir``
    continued, or with ``overwrite`` that run started over (an existing run is refused without one of them)."""
    return Trainer(config, out_dir, device=device, progress=progress).fit(resume, overwrite)
