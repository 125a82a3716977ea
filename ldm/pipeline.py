"""A diffusion model put together for use: UNet + schedule + sampling settings (+ VAE for latent models).

Composes the pieces; the math lives in ``diffusion``, ``samplers``, ``unet`` and ``vae``.
Everything the samplers see is in "model space" (pixels in [−1, 1], or scaled latents);
``encode``/``decode`` cross between it and images. A pipeline comes from an ``ldm train`` run
(``from_run``) or from a diffusers DDPM/DDIM folder such as the original DDPM models (``from_pretrained``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_state_dict_file, load_weights, read_json
from .convert import (ddpm_sampling_from_diffusers, import_state_dict, scheduler_from_diffusers, unet_config_from_diffusers,
                      unet_layout)
from .diffusion import PREDICTIONS, Prediction, q_sample
from .latent import check_vae_matches, load_vae
from .loop import read_run
from .samplers import DEFAULT_SPACING, StepRecord, classifier_free_guidance, get_sampler, randn, sampler_timesteps
from .schedule import NoiseSchedule, ScheduleConfig, Spacing
from .train import TrainConfig
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL

Labels = int | Sequence[int] | torch.Tensor | None
Variance = Literal["fixed_small", "fixed_large"]


@dataclass(frozen=True)
class SamplingConfig:
    """What sampling needs besides the weights: the UNet's shape, the noise schedule, and how the reverse
    process reads the model's output. An ``ldm train`` run (``from_train``) and a diffusers scheduler
    config (``from_diffusers``) both give one.

    ``clip_x0`` clamps x̂_0 to the data range [−1, 1] at every step  [Ho et al. 2020, §3.3];
    ``variance`` is the DDPM sampler's σ_t²: β̃_t ("fixed_small") or β_t ("fixed_large")  [Ho et al. 2020, §3.2];
    ``spacing`` None means each sampler's diffusers default (``samplers.DEFAULT_SPACING``), as for a scheduler
    config without ``timestep_spacing``; ``set_alpha_to_one`` False ends DDIM's last step at ᾱ_0 instead of 1.
    """

    unet: UNetConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Prediction = "eps"
    clip_x0: bool = True
    variance: Variance = "fixed_small"
    spacing: Spacing | None = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; known: {', '.join(PREDICTIONS)}")
        if self.variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance {self.variance!r}; known: fixed_small, fixed_large")

    @classmethod
    def from_train(cls, config: TrainConfig) -> "SamplingConfig":
        """A training run's settings; its sampling steps are spaced "leading" for every sampler, as in training."""
        return cls(unet=config.unet, schedule=config.schedule, prediction=config.prediction, clip_x0=config.clip_sample)

    @classmethod
    def from_diffusers(cls, unet: dict[str, Any], scheduler: dict[str, Any]) -> "SamplingConfig":
        """A diffusers ``UNet2DModel`` config and a DDPM/DDIM ``scheduler_config.json`` (absent keys: ``DDPMScheduler``'s
        defaults, i.e. the DDPM paper's linear β 1e-4 → 0.02 over T = 1000, clipping, fixed_small)."""
        if unet.get("_class_name", "UNet2DModel") != "UNet2DModel":
            raise ValueError(f"the UNet is a {unet['_class_name']}; an unconditional pipeline needs a UNet2DModel "
                             "(Stable Diffusion folders: `ldm txt2img --checkpoint`)")
        size = unet.get("sample_size")
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"non-square sample_size {list(size)} is not supported")
            size = size[0]
        if not isinstance(size, int):
            raise ValueError(f"the UNet config gives no sample_size (got {size!r}): the image size is unknown")
        schedule = scheduler_from_diffusers(scheduler)
        ddpm = ddpm_sampling_from_diffusers(scheduler)
        return cls(unet=unet_config_from_diffusers(unet).with_(sample_size=size), schedule=schedule["schedule"],
                   prediction=schedule["prediction"], clip_x0=ddpm["clip_x0"], variance=ddpm["variance"],
                   spacing=schedule["spacing"], steps_offset=schedule["steps_offset"],
                   set_alpha_to_one=schedule["set_alpha_to_one"])


@dataclass
class DiffusionPipeline:
    unet: UNet
    schedule: NoiseSchedule
    config: SamplingConfig  # a TrainConfig is taken as its sampling part
    vae: AutoencoderKL | None = None

    def __post_init__(self):
        if isinstance(self.config, TrainConfig):
            self.config = SamplingConfig.from_train(self.config)

    @classmethod
    def from_run(cls, path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu",
                 vae: str | Path | None = None) -> "DiffusionPipeline":
        """Load a run directory (``config.json`` + ``checkpoint.pt``) or a checkpoint file; a diffusers
        folder goes to ``from_pretrained``.

        ``ema=True`` (the default) takes the EMA weights, which sample better. A latent model
        loads the VAE it was trained with (or ``vae``, checked to have the same latent shape and scale).
        """
        if is_diffusers_folder(path):
            if not ema or vae is not None:
                raise ValueError(f"{path} is a diffusers folder: it holds one set of weights and no VAE "
                                 "(raw weights and --vae are for `ldm train` runs)")
            return cls.from_pretrained(path, device=device)
        state, config = read_run(path, TrainConfig, "unet", "ldm train")
        unet = UNet(config.unet)
        load_weights(unet, state["ema"]["model"] if ema else state["model"], source=f"{path} ({'EMA' if ema else 'raw'} weights)")
        autoencoder = None
        if vae is not None or config.vae is not None:
            source = vae if vae is not None else config.vae
            autoencoder, _ = load_vae(source, device=device)
            check_vae_matches(config.vae_config, autoencoder, str(source))
        return cls(unet.to(device).eval(), NoiseSchedule(config.schedule), SamplingConfig.from_train(config), autoencoder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> "DiffusionPipeline":
        """Load a diffusers DDPM/DDIM folder, e.g. the original DDPM models ``google/ddpm-cifar10-32``,
        ``-celebahq-256``, ``-church-256``, ``-bedroom-256``, ``-cat-256``  [Ho et al. 2020] (presets
        ``UNetConfig.ddpm_cifar10`` and ``ddpm_256``), with the scheduler settings it was saved with.

        Layouts: ``model_index.json`` naming a DDPMPipeline or DDIMPipeline, with ``unet/`` and ``scheduler/``;
        ``unet/`` (and ``scheduler/``) without the index; or a bare ``UNet2DModel`` folder (``config.json`` +
        ``diffusion_pytorch_model.safetensors`` or ``.bin``, ``scheduler_config.json`` beside them or none:
        ``DDPMScheduler``'s defaults). Weights are checked key by key and shape by shape.
        """
        unet_dir, scheduler_file = diffusers_parts(Path(folder))
        config = SamplingConfig.from_diffusers(read_json(unet_dir / "config.json"),
                                               read_json(scheduler_file) if scheduler_file else {})
        weights = unet_weight_file(unet_dir)
        with torch.device("meta"):  # never initialised: the file's tensors are adopted
            unet = UNet(config.unet)
        import_state_dict(unet, load_state_dict_file(weights), unet_layout(config.unet, "diffusers"), str(weights), assign=True)
        return cls(unet.to(device=device, dtype=torch.float32).eval(), NoiseSchedule(config.schedule), config)

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

    # --- the config's settings for each sampler ---------------------------------------------------
    def timesteps(self, sampler: str, num_inference_steps: int, spacing: Spacing | None = None) -> torch.Tensor:
        """The decreasing timesteps ``sampler`` visits: ``spacing`` or the config's, else the sampler's diffusers
        default, shifted by the config's ``steps_offset`` (diffusers' "leading" spacing adds it)."""
        get_sampler(sampler)
        c = self.config
        return sampler_timesteps(sampler, self.schedule, num_inference_steps, spacing or c.spacing or DEFAULT_SPACING[sampler],
                                 c.steps_offset)

    def sampler_options(self, sampler: str, num_inference_steps: int, spacing: Spacing | None = None) -> dict[str, Any]:
        """The keyword arguments the config implies for ``sampler``: prediction type, x̂_0 clipping, the visited
        timesteps, DDPM's variance, and DDIM's ᾱ after the last step (ᾱ_0 when ``set_alpha_to_one`` is false)."""
        c = self.config
        options: dict[str, Any] = dict(prediction=c.prediction, clip_x0=c.clip_x0,
                                       timesteps=self.timesteps(sampler, num_inference_steps, spacing))
        if sampler == "ddpm":
            options["variance"] = c.variance
        if sampler == "ddim" and not c.set_alpha_to_one:
            options["final_alpha_bar"] = float(self.schedule.alpha_bar_f64[0])
        return options

    def shape(self, n: int) -> tuple[int, int, int, int]:
        u = self.config.unet
        return (n, u.in_channels, u.sample_size, u.sample_size)

    # --- sampling ------------------------------------------------------------------------------
    def loop(self, n: int, *, sampler: str = "ddim", num_inference_steps: int = 50, seed: int | torch.Generator = 0,
             class_label: Labels = None, guidance: float = 1.0, x_T: torch.Tensor | None = None,
             **options) -> Iterator[StepRecord]:
        """The reverse process for n samples, in model space, as a generator of per-step records.

        ``seed`` is an int or a CPU ``torch.Generator`` (x_T, unless given, and the sampler's noise
        come from it). ``options`` go to the sampler (``eta``, ``variance``, ``clip_x0``, ``timesteps`` …) and
        override the config's (``sampler_options``).
        """
        labels = self.labels(n, class_label)
        g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        x_T = randn(self.shape(n), g, self.device) if x_T is None else x_T.to(self.device)
        options = self.sampler_options(sampler, num_inference_steps, options.pop("spacing", None)) | options
        return get_sampler(sampler)(self.denoiser(labels, guidance), self.schedule, x_T, num_inference_steps=num_inference_steps,
                                    cond=labels, generator=g, **options)

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
        timesteps = self.timesteps(options.get("sampler", "ddim"), num_inference_steps, options.pop("spacing", None))[-run:]
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
    return torch.cat([q_sample(schedule, x0.expand(k, *x0.shape), t, eps.expand(k, *eps.shape))
                      for x0, eps in zip(images, noise)])


# --- diffusers DDPM/DDIM folders -------------------------------------------------------------------------
PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder in diffusers' layout (``model_index.json``, ``unet/``, or a model's ``config.json`` naming its
    ``_class_name``) rather than an ``ldm train`` run, whose ``config.json`` has no ``_class_name``."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return True
    return (path / "config.json").is_file() and not (path / "checkpoint.pt").exists() \
        and "_class_name" in read_json(path / "config.json")


def diffusers_parts(folder: Path) -> tuple[Path, Path | None]:
    """Where a diffusers DDPM/DDIM folder keeps its UNet (a folder: config + weights) and its scheduler config (or None)."""
    index_file = folder / "model_index.json"
    if index_file.is_file():
        name = read_json(index_file).get("_class_name")
        if name not in PIPELINE_CLASSES:
            hint = " (Stable Diffusion: `ldm txt2img --checkpoint`)" if "StableDiffusion" in str(name) else ""
            raise CheckpointError(f"{folder} holds a diffusers {name}; this loader reads {' and '.join(PIPELINE_CLASSES)} "
                                  f"folders{hint}")
        return folder / "unet", _existing(folder / "scheduler" / "scheduler_config.json")
    if (folder / "unet").is_dir():
        return folder / "unet", _existing(folder / "scheduler" / "scheduler_config.json")
    return folder, _existing(folder / "scheduler_config.json")  # a bare UNet2DModel folder


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def unet_weight_file(folder: Path) -> Path:
    """``diffusion_pytorch_model.safetensors``, else ``.bin`` (read through the weights-only unpickler)."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")) if folder.is_dir() else []
    raise CheckpointError(f"no UNet weights in {folder} (looked for {', '.join(WEIGHT_NAMES)}; found {found or 'none'})")
