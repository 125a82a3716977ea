"""The one way to sample: sampling settings, and what every pipeline shares.

Both pipelines — ``DiffusionPipeline`` (ldm runs, diffusers DDPM/DDIM folders) and ``StableDiffusion`` —
are a ``Pipeline``: a UNet denoising in "model space" (pixels in [−1, 1], or scaled latents), a noise
schedule, and a ``SamplingConfig`` saying how the reverse process reads the UNet. They speak the same
verbs and keywords:

    pipe.loop(...)          a generator of per-step ``StepRecord``s (x_t, x̂_0, x_prev)
    pipe(...)               images: ``loop`` run to the end and decoded (PIL, or a tensor with output="tensor")
    pipe.img2img(image, …)  SDEdit: start part-way, from the image noised to that step
    sampler, num_inference_steps, seed, seeds, guidance_scale, strength, x_T — spelled the same everywhere

and share one ``sampler_options`` (the config's settings in each sampler's keywords), one img2img step rule,
one seed per image (``generators``), and one classifier-free-guided denoiser over a ``Conditioning`` record.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from PIL import Image

from .conditioning import Conditioning
from .diffusion import PREDICTIONS, Model, Prediction
from .images import to_pil, to_uint8
from .perf import disable_fast_cpu
from .preview import Previewer, with_previews
from .samplers import (DEFAULT_SPACING, classifier_free_guidance, randn, resolve_sampler, run_to_end,
                       sampler_sigmas, sampler_timesteps)
from .samplers.sigmas import SigmaSchedule
from .samplers.common import Generators
from .samplers.euler import sigmas_at
from .schedule import NoiseSchedule, ScheduleConfig, Spacing

Variance = Literal["fixed_small", "fixed_large"]
Output = Literal["pil", "tensor"]


@dataclass(frozen=True)
class SamplingConfig:
    """What sampling needs besides the weights: the noise schedule and how the reverse process reads the model.

    ``prediction``: what the UNet outputs (ε, x₀ or v). ``clip_x0`` clamps x̂_0 to the data range [−1, 1] at every
    step  [Ho et al. 2020, §3.3]; ``variance`` is the DDPM sampler's σ_t²: β̃_t ("fixed_small") or β_t
    ("fixed_large")  [Ho et al. 2020, §3.2]. ``spacing``, ``steps_offset`` and ``set_alpha_to_one`` are diffusers'
    scheduler settings: they pick the visited timesteps (``spacing=None``: each sampler's diffusers default,
    ``samplers.DEFAULT_SPACING``, as for a scheduler config without ``timestep_spacing``), and False for
    ``set_alpha_to_one`` ends DDIM's last step at ᾱ_0 instead of 1. Matching them gives diffusers' images.
    ``ldm.convert.scheduler`` reads and writes this as a diffusers ``scheduler_config.json``.
    """

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

    def with_(self, **changes) -> "SamplingConfig":
        return replace(self, **changes)

    @classmethod
    def stable_diffusion(cls, prediction: Prediction = "eps") -> "SamplingConfig":
        """Stable Diffusion's scheduler settings (SD 1.5's ``scheduler_config.json``): the scaled-linear schedule,
        no clipping, each sampler's own spacing, timesteps shifted by one, DDIM ending at ᾱ_0."""
        return cls(schedule=ScheduleConfig.stable_diffusion(), prediction=prediction, clip_x0=False, spacing=None,
                   steps_offset=1, set_alpha_to_one=False)


def img2img_steps(num_inference_steps: int, strength: float) -> int:
    """How many of S steps image-to-image runs: ⌊strength · S⌋ (diffusers' rule, so seeds match its images)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run == 0:
        raise ValueError(f"strength {strength} with {num_inference_steps} steps runs no step at all "
                         f"(it needs strength ≥ 1/{num_inference_steps})")
    return run


def generators(n: int, seed: int | torch.Generator = 0, seeds: Sequence[int] | None = None) -> Generators:
    """The random streams for n images: one CPU generator per image, seeded ``seeds[k]`` or else ``seed + k``.

    Every random draw of a run (x_T, a VAE posterior sample, a stochastic sampler's per-step noise) takes image k's
    share from generator k (``samplers.randn``), so image k of a batch is the image its seed gives alone, and a batch
    of one is what ``seed`` always gave. A ``torch.Generator`` passed as ``seed`` is one stream for the whole batch,
    used as it is (to continue a stream across calls).
    """
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
    elif isinstance(seed, torch.Generator):
        return seed
    else:
        seeds = list(range(seed, seed + n))
    return [torch.Generator().manual_seed(s) for s in seeds]


def default_device() -> str:
    """CUDA when there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline:
    """What both pipelines share: the sampling settings and schedule, the guided denoiser, the sampler options,
    the image-to-image start and the end of a run. A subclass sets ``self.unet`` and writes ``loop``, ``decode``
    and ``__call__`` for its inputs (a number of samples and class labels, or prompts and an image size)."""

    default_sampler = "ddim"
    default_steps = 50
    unet: torch.nn.Module

    def __init__(self, sampling: SamplingConfig):
        self.sampling = sampling
        self.autocast: torch.dtype | None = None  # e.g. torch.bfloat16: run the UNet under autocast

    @property
    def sampling(self) -> SamplingConfig:
        return self._sampling

    @sampling.setter
    def sampling(self, sampling: SamplingConfig) -> None:
        """Replacing the settings (``pipe.sampling = pipe.sampling.with_(spacing="trailing")``) rebuilds the schedule."""
        self._sampling, self.schedule = sampling, NoiseSchedule(sampling.schedule)

    @property
    def models(self) -> list[torch.nn.Module]:
        """The pipeline's models (text encoders, UNet, VAE), for placement."""
        raise NotImplementedError

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move the models. A VAE stays in float32 when asked for float16: its decoder's activations overflow
        fp16's range (diffusers' ``force_upcast``)."""
        for model in self.models:
            vae_in_fp16 = model is getattr(self, "vae", None) and dtype == torch.float16
            model.to(device=device, dtype=torch.float32 if vae_in_fp16 else dtype)
        return self

    def compile(self, **options) -> "Pipeline":
        """Run the UNet under ``torch.compile`` (inductor; ``options`` go to it), in place: state-dict keys, LoRAs and
        saving are unchanged. Inductor traces plain PyTorch, so ``ldm.perf``'s fast convolutions are switched off
        first (their per-call filter transforms would split its graph). It fuses the elementwise work between the
        convolutions (GroupNorm, SiLU, residual adds); ``benchmarks/realtime.py`` measures it. The first call at each
        new shape (batch, size, guided or not) compiles, which takes minutes on a CPU, so it pays for long sessions
        only: off unless asked for."""
        disable_fast_cpu(self.unet)
        self.unet.compile(**options)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # --- the sampler's settings ------------------------------------------------------------------------
    def timesteps(self, sampler: str, num_inference_steps: int, spacing: Spacing | None = None,
                  sigmas: SigmaSchedule | None = None) -> torch.Tensor:
        """The decreasing timesteps ``sampler`` (a key or a UI name) visits: ``spacing`` or the config's, else the
        sampler's diffusers default, shifted by the config's ``steps_offset``; or those of a σ schedule."""
        key, sigmas = resolve_sampler(sampler, sigmas)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        c = self.sampling
        return sampler_timesteps(key, self.schedule, num_inference_steps, spacing or c.spacing or DEFAULT_SPACING[key],
                                 c.steps_offset, sigmas)

    def sampler_options(self, sampler: str, num_inference_steps: int, spacing: Spacing | None = None,
                        sigmas: SigmaSchedule | None = None) -> dict[str, Any]:
        """The keyword arguments the config implies for ``sampler``: prediction type, x̂_0 clipping, the visited
        timesteps, DDPM's variance, and DDIM's ᾱ after the last step (ᾱ_0 when ``set_alpha_to_one`` is false).
        With a σ schedule (``sigmas``, or a UI name such as "DPM++ 2M Karras") the sampler picks its timesteps
        itself, from the spacing's σ range (the Euler family's)."""
        c = self.sampling
        key, sigmas = resolve_sampler(sampler, sigmas)
        options: dict[str, Any] = dict(prediction=c.prediction, clip_x0=c.clip_x0)
        if sigmas is None:
            options["timesteps"] = self.timesteps(key, num_inference_steps, spacing)
        else:
            options |= dict(sigmas=sigmas, spacing=spacing or c.spacing or DEFAULT_SPACING[key],
                            steps_offset=c.steps_offset)
        if key == "ddpm":
            options["variance"] = c.variance
        if key == "ddim" and not c.set_alpha_to_one:
            options["final_alpha_bar"] = float(self.schedule.alpha_bar_f64[0])
        return options

    def start(self, sampler: str, num_inference_steps: int, options: dict[str, Any], shape: tuple[int, ...],
              generator: Generators, x_T: torch.Tensor | None = None, x0: torch.Tensor | None = None,
              strength: float = 1.0, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x_T, the sampler's keyword arguments) for a run: the config's ``sampler_options``, overridden by the
        caller's ``options`` (``spacing`` among them picks the timesteps, ``sigmas`` a σ schedule).

        x_T is the caller's, or ε: ``noise`` if given, else drawn from ``generator`` (one per image: see
        ``generators``); for image-to-image (``x0`` given, strength < 1) the run keeps the last ``img2img_steps``
        timesteps and starts from x_0 noised to the first of them (``noised``)  [SDEdit, Meng et al. 2022, §3]. On a σ
        schedule the sampler plans its own steps: it is told to ``begin`` at step S − ``img2img_steps`` of its S-step
        plan (diffusers' ``set_begin_index``), and x_0 is noised to that step's σ (``levels``, ``noised_to``)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        options = dict(options)
        kwargs = self.sampler_options(sampler, num_inference_steps, options.pop("spacing", None),
                                      options.pop("sigmas", None)) | options
        if x0 is not None and strength < 1.0:
            run = img2img_steps(num_inference_steps, strength)
            if "sigmas" in kwargs:
                kwargs["begin"] = num_inference_steps - run
            else:
                kwargs["timesteps"] = kwargs["timesteps"][-run:]
            noise = randn(shape, generator, self.device) if noise is None else noise
            x_T = self.noised_to(x0.expand(shape), self.levels(sampler, num_inference_steps, kwargs)[0], noise)
        elif x_T is None:
            x_T = randn(shape, generator, self.device) if noise is None else noise
        return x_T.to(self.device, torch.float32), kwargs

    def levels(self, sampler: str, num_inference_steps: int, kwargs: dict[str, Any]) -> torch.Tensor:
        """σ = √((1 − ᾱ)/ᾱ) at each step of the run ``start``'s kwargs describe (float64): at its ``timesteps``
        (``sigmas_at``), or the σ schedule's plan from step ``begin`` on (``samplers.sampler_sigmas``)."""
        if "sigmas" not in kwargs:
            return sigmas_at(self.schedule, torch.as_tensor(kwargs["timesteps"]))
        plan = sampler_sigmas(sampler, self.schedule, num_inference_steps, kwargs["spacing"], kwargs["steps_offset"],
                              kwargs["sigmas"])
        return plan[kwargs.get("begin", 0):]

    def noised_to(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 noised to σ, in model space: √ᾱ x_0 + √(1 − ᾱ) ε with ᾱ = 1/(1 + σ²) (= (x_0 + σ ε)/√(1 + σ²), the
        σ-space x_σ that diffusers' Euler ``add_noise`` makes, read as the model sees it)."""
        alpha_bar = (1 + sigma**2).reciprocal()
        return alpha_bar.sqrt().to(x0.dtype) * x0 + (1 - alpha_bar).sqrt().to(x0.dtype) * noise

    def noised(self, x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  [Ho et al. 2020, Eq. 4] at a timestep t that may be fractional (the Euler
        samplers' "linspace" steps): ᾱ_t = 1/(1 + σ_t²) with σ linear in t between training steps, as those samplers
        and diffusers' ``add_noise`` for them read it; on a training step this is the schedule's ᾱ_t."""
        sigma = sigmas_at(self.schedule, torch.as_tensor(t, dtype=torch.float64).reshape(1))[0]
        return self.noised_to(x0, sigma, noise)

    # --- the model the samplers run ----------------------------------------------------------------------
    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def denoiser(self, guidance_scale: float = 1.0, uncond: Conditioning | None = None, guidance_rescale: float = 0.0) -> Model:
        """The UNet as a sampler model ``(x_t, t, Conditioning) → prediction``: in its dtype (and autocast), with
        the record's extra channels appended to x_t, classifier-free guided by ``uncond`` when the scale is not 1.
        An LCM-distilled UNet (``time_cond_proj_dim``) is never guided: the scale reaches it as the record's
        ``timestep_cond``, in one pass. Latents stay float32 between steps whatever the weights' dtype."""

        def unet(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            if cond.concat is not None:
                x = torch.cat([x, cond.concat], dim=1)
            with self._autocast():
                return self.unet(x.to(self.dtype), t, cond.token, pooled=cond.pooled, size_ids=cond.size_ids,
                                 timestep_cond=cond.timestep_cond).float()

        if guidance_scale == 1.0 or getattr(self.unet.config, "time_cond_proj_dim", None) is not None:
            return unet
        return classifier_free_guidance(unet, guidance_scale, uncond, guidance_rescale)

    def steps_run(self, num_inference_steps: int | None = None, strength: float = 1.0, image=None) -> int:
        """How many steps ``loop`` runs: all S, or for image-to-image the last ``img2img_steps`` of them."""
        steps = num_inference_steps or self.default_steps
        return img2img_steps(steps, strength) if image is not None and strength < 1.0 else steps

    # --- previews -------------------------------------------------------------------------------------
    def previewer(self, kind: Any = "auto") -> Previewer:
        """x̂_0 → a preview image (``ldm.preview.Previewer``): "auto", "linear", "tiny:PATH" (or an
        ``AutoencoderTiny``), "full". Made once per kind (a fitted linear map is fitted once)."""
        cache = self.__dict__.setdefault("_previewers", {})
        key = kind if isinstance(kind, str) else id(kind)
        if key not in cache:
            cache[key] = Previewer(kind, self.decode, **self.preview_options())
        return cache[key]

    def preview_options(self) -> dict[str, Any]:
        """What ``Previewer`` needs to know of this pipeline's model space: the factor from it to image pixels, and
        the Stable Diffusion family (published linear factors, TAESD) or a way to fit a linear map."""
        raise NotImplementedError

    def with_previews(self, records, preview: Any = "auto"):
        """The sampler's records with ``previewer(preview)`` on each (None: no previews)."""
        return with_previews(records, None if preview in (None, "none") else self.previewer(preview))

    def run(self, records, total: int | None, progress: bool, output: Output) -> list[Image.Image] | torch.Tensor:
        """Run ``loop``'s records to the end with a progress bar and decode the last x_prev to ``output``."""
        return self.images(self.decode(run_to_end(records, total, progress, "denoise").x_prev), output)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space → images in [−1, 1]."""
        raise NotImplementedError

    # --- images ---------------------------------------------------------------------------------------------
    @staticmethod
    def images(x: torch.Tensor, output: Output) -> list[Image.Image] | torch.Tensor:
        """Images in [−1, 1] as ``output``: "pil" (a list of PIL images) or "tensor" ((B, C, H, W) in [−1, 1])."""
        if output == "tensor":
            return x
        if output != "pil":
            raise ValueError(f"unknown output {output!r}; known: pil, tensor")
        return [to_pil(image) for image in to_uint8(x)]

    def img2img(self, image, *args, strength: float = 0.75, **options):
        """Redraw ``image`` (PIL, or (B, C, H, W) in [−1, 1]): noise it to the step ``strength`` of the way back and
        denoise from there  [SDEdit, Meng et al. 2022]. strength → 0 keeps it, 1 ignores it. Other arguments as for
        ``__call__`` (a prompt for Stable Diffusion)."""
        return self(*args, image=image, strength=strength, **options)
