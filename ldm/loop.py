"""The training loop every model shares: budgets, optimizer steps, EMA, checkpoints, resume, DDP.

A subclass builds its model and says what one step's loss is (``loss``) and what its
samples look like (``save_samples``); this class does the rest. Run state (weights, EMA,
optimizer, step, RNG) is one checkpoint per run directory, written atomically, so
``resume`` continues exactly; ``ldm.run_dir`` guards the directory so that no run is overwritten by accident.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, atomic_save, atomic_save_json, load_weights, safe_load
from .config import from_dict, to_dict
from .cpu import describe, native_bf16
from .data import ImageDataset
from .ema import EMA
from .gradient_checkpointing import set_gradient_checkpointing
from .run_dir import BACKUP, back_up_checkpoint, check_free_space, check_run_dir
from .runs import CHECKPOINT, CONFIG


@dataclass(frozen=True)
class LoopConfig:
    """How to train, whatever the model: optimizer, budgets, precision, checkpoints."""

    batch_size: int = 64  # global: split across processes
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 keeps the EMA equal to the raw weights
    ema_gamma: float = 8.0  # the EMA's warm-up averages step j's weights ∝ j^γ until ema_decay caps it (ldm.ema)
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"  # auto: bf16 where the hardware has it
    channels_last: bool = False
    gradient_checkpointing: bool = False  # recompute each stage in backward: less memory, ~⅓ more compute per step
    compile: bool = False  # torch.compile the training forward/backward (inductor); its compile time counts in the budget
    steps: int | None = None  # total optimizer steps, counting resumed ones
    max_minutes: float | None = None  # wall-clock budget of one invocation
    checkpoint_every: int = 500  # steps …
    checkpoint_minutes: float = 5.0  # … or minutes since the last checkpoint, whichever comes first
    sample_every: int = 1000  # 0: only at the end
    seed: int = 0

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"mixed_precision must be no, bf16, fp16 or auto; got {self.mixed_precision!r}")
        positive = dict(batch_size=self.batch_size, lr=self.lr, steps=self.steps, max_minutes=self.max_minutes,
                        checkpoint_every=self.checkpoint_every, checkpoint_minutes=self.checkpoint_minutes)
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be > 0, got {value}")
        if self.sample_every < 0 or self.warmup_steps < 0:
            raise ValueError(f"sample_every and warmup_steps must be ≥ 0, got {self.sample_every}, {self.warmup_steps}")


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """"auto" → bf16 on CPUs with native bf16 (AVX512-BF16/AMX; elsewhere bf16 autocast is slower than
    fp32), bf16 or else fp16 on CUDA; anything else unchanged."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if native_bf16() else "no"


def with_fields(config: Any, **changes) -> Any:
    """``dataclasses.replace`` that sends fields of the nested ``loop`` config there, so
    ``config.with_(steps=10, lr=1e-3)`` works on any config that has a ``loop``."""
    loop_names = {f.name for f in dataclasses.fields(LoopConfig)}
    own = {k: v for k, v in changes.items() if k not in loop_names or k == "loop"}
    loop = {k: v for k, v in changes.items() if k in loop_names}
    if loop:
        own["loop"] = replace(own.get("loop", config.loop), **loop)
    return replace(config, **own)


def adamw(params, **options) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where this torch has it for the device (CPU from torch 2.4): the
    optimizer step of the 0.3 M-parameter MNIST UNet's 100-odd small tensors is otherwise a loop of tiny ops."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except (RuntimeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, **options)


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


class TrainLoop:
    """Shared machinery for a config with a ``loop: LoopConfig`` field; ``model_fields`` names the
    config fields a resumed run must not change."""

    model_fields: tuple[str, ...] = ()

    def __init__(self, config: Any, out_dir: str | Path, data: ImageDataset, *, device: str | None = None,
                 progress: bool = True):
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if config.loop.batch_size % self.world:
            raise ValueError(f"batch_size {config.loop.batch_size} is not divisible by {self.world} processes")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.config, self.data = config, data
        self.precision = resolve_precision(config.loop.mixed_precision, self.device)
        self.out_dir = Path(out_dir)
        self.progress = progress and self.rank == 0
        # Timesteps, noise, flips and label dropout; the global RNG (dropout) is saved separately.
        self.generator = torch.Generator().manual_seed(config.loop.seed * 1000 + self.rank)
        self.step = 0
        self.losses: list[float] = []
        self.claimed = False  # whether this run may write into out_dir (it resumed from it or checked it)
        self.backup: Path | None = None  # the overwritten run's checkpoint, until this run's first save
        torch.manual_seed(config.loop.seed)

    def setup_model(self, model: nn.Module) -> None:
        """Call once from the subclass with its trainable model: optimizer, EMA, DDP wrapper."""
        c = self.config.loop
        self.model = model.to(self.device)
        if c.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if c.gradient_checkpointing:  # a runtime switch, not the model's config: a resume may turn it on or off
            set_gradient_checkpointing(self.model)
        self.ema = EMA(self.model, c.ema_decay, c.ema_gamma)
        self.optimizer = adamw(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16" and self.device.type == "cuda")
        self.ddp_model = (torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None) if self.distributed else self.model)
        if c.compile:  # wraps the forward only: self.model (weights, EMA, checkpoints) stays the plain module
            self.ddp_model = torch.compile(self.ddp_model)

    # --- state ---------------------------------------------------------------------------
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
        """Write config.json and the checkpoint (rank 0), each atomically: a kill or a full disk keeps the last ones."""
        if self.rank != 0:
            return
        atomic_save_json(to_dict(self.config), self.out_dir / CONFIG)
        atomic_save(self.state_dict(), self.out_dir / CHECKPOINT)
        if self.backup is not None:
            self.backup.unlink(missing_ok=True)
            self.backup = None

    def claim(self, overwrite: bool = False) -> None:
        """Before the first step: check ``out_dir`` (writable, room for a checkpoint, no other run in it unless
        ``overwrite``) and write its config.json, so even a run killed at once leaves a directory that says what it was."""
        if self.claimed:
            return
        check_run_dir(self.out_dir, overwrite=overwrite)
        check_free_space(self.out_dir, self.checkpoint_bytes())
        if self.rank == 0:
            if overwrite and back_up_checkpoint(self.out_dir):
                self.backup = self.out_dir / BACKUP
            atomic_save_json(to_dict(self.config), self.out_dir / CONFIG)
        self.claimed = True

    def checkpoint_bytes(self) -> int:
        """About the size of a checkpoint: weights, EMA weights and AdamW's two moments, plus 1 MiB of the rest."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return 4 * weights + 2**20

    def resume(self, path: str | Path | None = None) -> None:
        """Restore everything from ``path`` (default: this run's checkpoint) to continue exactly."""
        state = safe_load(Path(path) if path else self.out_dir / CHECKPOINT)
        saved = from_dict(type(self.config), state["config"])
        ours, theirs = self.model_signature(self.config), self.model_signature(saved)
        changed = [name for name in ours if ours[name] != theirs[name]]
        if changed:
            details = "\n".join(f"  {name}: saved {theirs[name]}\n  {' ' * len(name)}  now   {ours[name]}" for name in changed)
            raise CheckpointError(f"checkpoint was trained with another model config:\n{details}")
        self.load_state_dict(state)
        self.claimed = self.claimed or path is None  # continuing this directory's own run

    def model_signature(self, config: Any) -> dict[str, Any]:
        """The parts of a config that fix the model's shape and meaning; a resume must not change them."""
        return {name: getattr(config, name) for name in self.model_fields}

    def load_state_dict(self, state: dict) -> None:
        load_weights(self.model, state["model"])
        self.ema.load_state_dict(state["ema"])
        kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kernel in zip(self.optimizer.param_groups, kernels):  # how to step is this machine's choice
            group.update(kernel)
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.losses = state["step"], list(state["losses"])

    # --- one step ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then constant (budgets are in minutes, so no fixed end to decay to)."""
        return self.config.loop.lr * min(1.0, (step + 1) / max(1, self.config.loop.warmup_steps))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's share of the step's batch: (x in [−1, 1] on device, labels or None)."""
        c = self.config.loop
        idx = epoch_indices(len(self.data), c.batch_size, self.step, c.seed)
        x, labels = self.data.batch(idx[self.rank :: self.world], self.generator)
        x = x.to(self.device)
        if c.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, (labels.to(self.device) if labels is not None else None)

    def autocast(self):
        mp = self.precision
        if mp == "no":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def loss(self) -> torch.Tensor:
        """The scalar loss of one step (runs under autocast); subclasses define it."""
        raise NotImplementedError

    def train_step(self) -> float:
        self.ddp_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with self.autocast():
            loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        value = loss.detach().float()
        if self.distributed:  # every process logs (and NaN-checks) the same global mean
            dist.all_reduce(value)
            value = value / self.world
        value = value.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at step {self.step}; the last checkpoint in {self.out_dir} "
                                   "is from before it (try a lower lr or mixed_precision=no)")
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.loop.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        self.losses.append(value)
        return value

    # --- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> "TrainLoop":
        """Resume from this run's checkpoint if asked (or start over in its directory with ``overwrite``),
        then train to the budget."""
        if resume and overwrite:
            raise ValueError("resume continues the run in out_dir and overwrite starts it over: give one of them")
        if resume:
            self.resume()
        self.train(overwrite=overwrite)
        return self

    def train(self, overwrite: bool = False) -> Path:
        """Train until ``steps`` (total, counting resumed ones) or ``max_minutes`` (this call) run out.

        A checkpoint is written every ``checkpoint_every`` steps or ``checkpoint_minutes`` minutes. Ctrl-C or
        SIGTERM (to every process under torchrun) stop after the current step with a checkpoint written. Under
        DDP rank 0 decides when to stop and every rank stops at the same step. Returns the run dir.
        """
        c = self.config.loop
        if c.steps is None and c.max_minutes is None:
            raise ValueError("set a budget: steps and/or max_minutes")
        self.claim(overwrite)
        start = time.monotonic()
        deadline = start + 60 * c.max_minutes if c.max_minutes is not None else math.inf
        first_step, saved_step, last_save = self.step, None, start
        stop = {"signal": None}
        restore = self._install_signal_handlers(stop)
        if self.progress:
            print(describe(self.device, c.mixed_precision, self.precision))
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        try:
            while (c.steps is None or self.step < c.steps) and not self.should_stop(deadline, stop):
                loss = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_at(self.step):.1e}")
                if self.step % c.checkpoint_every == 0 or time.monotonic() - last_save >= 60 * c.checkpoint_minutes:
                    self.save()
                    saved_step, last_save = self.step, time.monotonic()
                if c.sample_every and self.step % c.sample_every == 0 and self.rank == 0:
                    self.save_samples(self.out_dir / "samples" / f"step_{self.step:07d}.png")
        finally:
            bar.close()
            restore()
        if self.step != saved_step and (self.step > first_step or not (self.out_dir / CHECKPOINT).exists()):
            self.save()
        if self.step == first_step:
            if self.rank == 0:
                print(f"{self.out_dir} is at step {self.step}: nothing to train (raise --steps to go on)")
            return self.out_dir
        if self.rank == 0:
            if stop["signal"] is None:
                self.save_samples(self.out_dir / "samples.png", progress=self.progress)
            else:
                print(f"stopped by {stop['signal']} at step {self.step}; checkpoint saved in {self.out_dir}")
        return self.out_dir

    def should_stop(self, deadline: float, stop: dict) -> bool:
        """Stop now? On a signal, or when rank 0's clock passes the deadline. Under DDP one all-reduce of a
        code (0 go on, 1 deadline, 2 signal) gives every rank the same answer, so all stop at the same step
        and none is left waiting in a collective the others never join."""
        code = 2 if stop["signal"] else 1 if self.rank == 0 and time.monotonic() >= deadline else 0
        if self.distributed:
            flag = torch.tensor([code], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
            if code == 2 and stop["signal"] is None:
                stop["signal"] = "a signal to another process"
        return code > 0

    def save_samples(self, path: Path, progress: bool = False) -> None:
        """Write a picture of what the model does now (rank 0 only)."""
        raise NotImplementedError

    def _install_signal_handlers(self, stop: dict):
        """SIGTERM and a first Ctrl-C ask the loop to stop after the current step (a second Ctrl-C aborts)."""

        def request(signum, frame):
            if stop["signal"] is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop["signal"] = signal.Signals(signum).name
            if self.rank == 0 and signum == signal.SIGINT:
                print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)")

        try:
            previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            return lambda: None
        return lambda: [signal.signal(s, handler) for s, handler in previous.items()]
