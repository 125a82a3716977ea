"""Training a pixel-space diffusion model: the configuration, its presets, and the loop.

One step: draw a batch x_0, t ~ U{0..T−1}, ε ~ N(0, I); minimise L_simple (``ldm.losses``)
with AdamW; update the EMA weights. State (model, EMA, optimizer, step, RNG) lives in one
checkpoint per run directory, written atomically, so ``resume`` continues exactly.
Multi-process: launch with ``torchrun``; each process takes its share of every batch.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, atomic_save, load_weights, safe_load
from .config import from_dict, save_json, to_dict
from .data import ImageDataset, load_dataset
from .diffusion import PREDICTIONS, Prediction
from .ema import EMA
from .images import save_grid
from .losses import diffusion_loss
from .samplers import sample
from .schedule import NoiseSchedule, ScheduleConfig
from .unet import UNet, UNetConfig

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"


@dataclass(frozen=True)
class TrainConfig:
    unet: UNetConfig = field(default_factory=UNetConfig.mnist)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "eps"
    dataset: str = "mnist-bundled"
    data_dir: str | None = None
    class_conditional: bool = False
    class_dropout: float = 0.1  # probability of replacing a label by the null label (for CFG)
    batch_size: int = 64  # global: split across processes
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    min_snr_gamma: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False
    steps: int | None = None
    max_minutes: float | None = None
    checkpoint_every: int = 500
    sample_every: int = 1000
    sample_n: int = 64
    sample_steps: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; known: {', '.join(PREDICTIONS)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16; got {self.mixed_precision!r}")

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    @classmethod
    def mnist(cls) -> "TrainConfig":
        """The 20-minute CPU recipe for 28×28 digits (see README for how its numbers were chosen)."""
        return cls(unet=UNetConfig.mnist(), schedule=ScheduleConfig.cosine(), batch_size=64, lr=1e-3,
                   warmup_steps=200, ema_decay=0.999)

    @classmethod
    def cifar10(cls) -> "TrainConfig":
        """The DDPM paper's CIFAR-10 setup  [Ho et al. 2020, App. B] (a GPU job: days on a CPU)."""
        return cls(unet=UNetConfig.ddpm_cifar10(), schedule=ScheduleConfig.ddpm(), dataset="cifar10",
                   batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999, sample_every=10000,
                   checkpoint_every=5000)


PRESETS = {"mnist": TrainConfig.mnist, "cifar10": TrainConfig.cifar10}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is from before it."""


def epoch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """The global batch of dataset indices for ``step``: a fresh seeded permutation every epoch,
    a function of the step alone, so a resumed run sees exactly the batches it would have."""
    steps_per_epoch = n // batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch} is larger than the dataset ({n} images)")
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch : (k + 1) * batch]


def load_model_config_dataset(config: TrainConfig) -> tuple[TrainConfig, ImageDataset]:
    """Load the dataset and fit the UNet config to it (image size, channels, classes)."""
    u = config.unet
    data = load_dataset(config.dataset, config.data_dir, image_size=u.sample_size, channels=u.in_channels)
    if data.image_size != u.sample_size or data.channels != u.in_channels:
        raise ValueError(f"dataset {config.dataset} gives {data.channels}×{data.image_size}² images, "
                         f"the UNet expects {u.in_channels}×{u.sample_size}²")
    if config.class_conditional:
        if data.num_classes is None:
            raise ValueError(f"--class-conditional needs a labelled dataset; {config.dataset} has no labels")
        config = config.with_(unet=u.with_(num_classes=data.num_classes))
    return config, data


class Trainer:
    """Owns the model, optimizer, EMA and the run directory; ``train()`` runs until a budget ends."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, *, device: str | None = None,
                 dataset: ImageDataset | None = None, progress: bool = True):
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {self.world} processes")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dataset is None:
            config, dataset = load_model_config_dataset(config)
        elif config.class_conditional and config.unet.num_classes is None:
            config = config.with_(unet=config.unet.with_(num_classes=dataset.num_classes))
        self.config, self.data = config, dataset
        self.out_dir = Path(out_dir)
        self.progress = progress and self.rank == 0

        torch.manual_seed(config.seed)
        self.model = UNet(config.unet).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schedule = NoiseSchedule(config.schedule)
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.mixed_precision == "fp16" and self.device.type == "cuda")
        self.ddp_model = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
                          if self.distributed else self.model)
        # Timesteps, noise, flips and label dropout; global RNG (dropout) is saved separately.
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.step = 0
        self.losses: list[float] = []

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": to_dict(self.config),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": self.losses,
        }

    def save(self) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_json(self.config, self.out_dir / CONFIG)
        atomic_save(self.state_dict(), self.out_dir / CHECKPOINT)

    def resume(self, path: str | Path | None = None) -> None:
        """Restore everything from ``path`` (default: this run's checkpoint) to continue exactly."""
        state = safe_load(Path(path) if path else self.out_dir / CHECKPOINT)
        saved = from_dict(TrainConfig, state["config"])
        if saved.unet != self.config.unet or saved.schedule != self.config.schedule:
            raise CheckpointError(f"checkpoint was trained with another model config:\n  saved {saved.unet}\n  now   {self.config.unet}")
        load_weights(self.model, state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.losses = state["step"], list(state["losses"])

    # --- one step --------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then constant (budgets are in minutes, so no fixed end to decay to)."""
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup_steps))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = epoch_indices(len(self.data), self.config.batch_size, self.step, self.config.seed)
        x0, labels = self.data.batch(idx[self.rank :: self.world], self.generator)
        if labels is not None and self.config.unet.num_classes is not None:
            drop = torch.rand(labels.shape, generator=self.generator) < self.config.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.config.unet.num_classes), labels).to(self.device)
        else:
            labels = None
        x0 = x0.to(self.device)
        if self.config.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0, labels

    def autocast(self):
        mp = self.config.mixed_precision
        if mp == "no":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def train_step(self) -> float:
        self.ddp_model.train()
        x0, labels = self.batch()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with self.autocast():
            loss = diffusion_loss(self.ddp_model, self.schedule, x0, prediction=self.config.prediction, cond=labels,
                                  generator=self.generator, min_snr_gamma=self.config.min_snr_gamma).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        value = loss.detach()
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
            value = value if self.device.type == "cuda" else value / self.world
        value = value.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at step {self.step}; the last checkpoint in {self.out_dir} "
                                   "is from before it (try a lower lr or mixed_precision=no)")
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        self.losses.append(value)
        return value

    # --- the loop --------------------------------------------------------------------------
    def train(self) -> Path:
        """Train until ``steps`` (total, counting resumed ones) or ``max_minutes`` (this call) run out.

        Ctrl-C or SIGTERM stop after the current step with a checkpoint written. Returns the run dir.
        """
        c = self.config
        if c.steps is None and c.max_minutes is None:
            raise ValueError("set a budget: steps and/or max_minutes")
        deadline = time.monotonic() + 60 * c.max_minutes if c.max_minutes is not None else math.inf
        stop = {"signal": None}
        restore = self._install_signal_handlers(stop)
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        try:
            while (c.steps is None or self.step < c.steps) and time.monotonic() < deadline and stop["signal"] is None:
                loss = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_at(self.step):.1e}")
                if self.step % c.checkpoint_every == 0:
                    self.save()
                if c.sample_every and self.step % c.sample_every == 0:
                    self.save_samples(self.out_dir / "samples" / f"step_{self.step:07d}.png")
        except KeyboardInterrupt:
            stop["signal"] = "KeyboardInterrupt"
        finally:
            bar.close()
            restore()
        self.save()
        if stop["signal"] is None:
            self.save_samples(self.out_dir / "samples.png")
        elif self.rank == 0:
            print(f"stopped by {stop['signal']} at step {self.step}; checkpoint saved in {self.out_dir}")
        return self.out_dir

    def _install_signal_handlers(self, stop: dict):
        if self.distributed or not hasattr(signal, "SIGTERM"):
            return lambda: None
        try:
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal="SIGTERM"))
        except ValueError:  # not the main thread
            return lambda: None
        return lambda: signal.signal(signal.SIGTERM, previous)

    @torch.no_grad()
    def save_samples(self, path: Path) -> None:
        if self.rank != 0 or not self.config.sample_n:
            return
        c, u = self.config, self.config.unet
        model = self.ema.model
        cond = None
        if u.num_classes:  # one row per class
            cond = torch.arange(c.sample_n, device=self.device) % u.num_classes
        g = torch.Generator().manual_seed(c.seed)
        x = sample(lambda x, t, y: model(x, t, y), self.schedule, (c.sample_n, u.in_channels, u.sample_size, u.sample_size),
                   sampler="ddim", num_inference_steps=c.sample_steps, prediction=c.prediction, cond=cond,
                   generator=g, device=self.device, progress=False)
        save_grid(x, path, nrow=u.num_classes or None)


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, device: str | None = None,
          progress: bool = True) -> Trainer:
    """Build a ``Trainer``, optionally resume it from ``out_dir``, and train to the budget."""
    trainer = Trainer(config, out_dir, device=device, progress=progress)
    if resume:
        trainer.resume()
    trainer.train()
    return trainer
