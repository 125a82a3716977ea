"""The Stable Diffusion families: everything that defines a model apart from its weights, with presets.

The checkpoint loader (``sd_checkpoint``) detects which of these a file holds; the pipeline
(``stable_diffusion``) is built from one. Distilled few-step models (SD-Turbo, SDXL-Turbo) have the weights of their
teacher's family, so the weights cannot tell them apart: ``choose_preset`` picks a named preset from the caller, a name
or the scheduler a diffusers folder ships, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal, Sequence

from .diffusion import Prediction
from .sampling import SamplingConfig
from .text_encoder import TextEncoderConfig
from .unet import UNetConfig
from .vae import VAEConfig

SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}
Distilled = Literal["turbo", "lcm"]


@dataclass(frozen=True)
class StableDiffusionConfig:
    """Everything that defines a Stable Diffusion model apart from its weights, and how it is sampled.

    ``sampling`` holds the diffusers scheduler settings the checkpoint ships with (schedule, ε or v, timestep
    spacing …; ``ldm.sampling.SamplingConfig``): they pick the sampler's timesteps, so matching them gives the
    same image. ``with_`` takes its fields directly: ``config.with_(prediction="eps", spacing="trailing")``.

    ``family`` is the architecture (what LoRAs and embeddings must match), so a distilled model keeps its teacher's:
    SD-Turbo is "sd2", SDXL-Turbo "sdxl". ``distilled`` says how it was trained to be sampled ("turbo": adversarial
    diffusion distillation, 1–4 steps without guidance; "lcm": a latent consistency model), and ``default_sampler``,
    ``default_steps`` and ``default_guidance`` are what a pipeline uses when the caller does not say (None: the
    pipeline's own defaults, e.g. StableDiffusion's dpm++2m, 25 steps, guidance 7.5).
    """

    unet: UNetConfig
    vae: VAEConfig = field(default_factory=VAEConfig.sd)
    text: TextEncoderConfig | None = field(default_factory=TextEncoderConfig.clip_vit_l14)  # None: only text_2 (refiner)
    sampling: SamplingConfig = field(default_factory=SamplingConfig.stable_diffusion)
    pad: Literal["eos", "zero"] = "eos"
    family: str = "sd1"
    size: int = 512  # the image side the model was trained at: the default width and height
    text_2: TextEncoderConfig | None = None  # SDXL's second text encoder (OpenCLIP bigG), padded with zeros
    zero_uncond: bool = False  # no negative prompt → an all-zero unconditional context (SDXL's force_zeros_for_empty_prompt)
    # SDXL's size ids end in an aesthetic score instead of the target size (the refiner; diffusers' flag of this name)
    requires_aesthetics_score: bool = False
    distilled: Distilled | None = None
    default_sampler: str | None = None  # a sampler key or UI name (ldm.samplers); the scheduler class the model ships
    default_steps: int | None = None
    default_guidance: float | None = None  # 1.0: no classifier-free guidance, the prompt batch alone

    @classmethod
    def sd15(cls) -> "StableDiffusionConfig":
        """Stable Diffusion v1.x (v1-4, v1-5 and their fine-tunes)."""
        return cls(unet=UNetConfig.sd15())

    @classmethod
    def sd15_inpainting(cls) -> "StableDiffusionConfig":
        """The v1-5 inpainting model: the UNet also sees the mask and the masked image's latents (9 channels)."""
        return cls(unet=UNetConfig.sd15(in_channels=9), family="sd1-inpainting")

    @classmethod
    def sd2(cls, prediction: Prediction = "v", in_channels: int = 4) -> "StableDiffusionConfig":
        """Stable Diffusion 2.x: OpenCLIP ViT-H/14 text encoder (penultimate layer, zero padding), 64-channel
        heads, 1024-wide context. The 768 models predict v, 2-base (512) and the inpainting model ε: the
        weights cannot tell, so the loader takes it from the file's metadata or the user."""
        return cls(unet=UNetConfig.sd2().with_(in_channels=in_channels), text=TextEncoderConfig.openclip_vit_h14(),
                   pad="zero", sampling=SamplingConfig.stable_diffusion(prediction), family="sd2-inpainting" if in_channels == 9 else "sd2",
                   size=768 if prediction == "v" else 512)

    @classmethod
    def sdxl(cls) -> "StableDiffusionConfig":
        """SDXL base 1.0  [Podell et al. 2023]: two text encoders (CLIP ViT-L and OpenCLIP bigG, penultimate layers
        without the final LayerNorm, concatenated into a 2048-wide context; bigG's pooled, projected output and the
        image size enter the UNet's time embedding), a 3-level UNet with 1/2/10-deep transformers, 1024² images."""
        return cls(unet=UNetConfig.sdxl(), vae=VAEConfig.sd().with_(scaling_factor=0.13025),
                   text=TextEncoderConfig.clip_vit_l14_sdxl(), text_2=TextEncoderConfig.openclip_vit_bigg14(),
                   sampling=SamplingConfig.stable_diffusion().with_(spacing="leading"), zero_uncond=True, family="sdxl",
                   size=1024)

    @classmethod
    def sdxl_refiner(cls) -> "StableDiffusionConfig":
        """SDXL refiner 1.0  [Podell et al. 2023, §2.5]: a second stage that denoises the base's last steps (or
        img2img at low strength). Only the OpenCLIP bigG encoder (a 1280-wide context, its pooled output), a 4-level
        UNet (2,259,526,660 parameters) of 384·(1, 2, 4, 4) channels with 4-deep transformers at the middle two levels and in the middle, and
        five size ids: original size, crop corner and an aesthetic score (6 for the prompt, 2.5 for the negative),
        so 1280 + 5·256 = 2560 added features. Its model_index.json sets force_zeros_for_empty_prompt false."""
        unet = UNetConfig.sdxl().with_(channels=384, channel_mult=(1, 2, 4, 4), attention=(False, True, True, False),
                                       transformer_depth=4, context_dim=1280, added_cond_dim=2560)
        return cls.sdxl().with_(unet=unet, text=None, pad="zero", zero_uncond=False, family="sdxl-refiner",
                                requires_aesthetics_score=True)

    @classmethod
    def sd_turbo(cls) -> "StableDiffusionConfig":
        """SD-Turbo  [Sauer et al. 2023, "Adversarial Diffusion Distillation"]: SD 2.1 (the 512² base, ε-prediction)
        distilled to sample in 1–4 steps without classifier-free guidance. stabilityai/sd-turbo ships an
        EulerDiscreteScheduler with "trailing" spacing (the first step at t = 999, pure noise) and otherwise SD's
        settings; its card samples with one step and guidance_scale=0.0."""
        return cls.sd2(prediction="eps").with_(spacing="trailing", distilled="turbo", default_sampler="euler",
                                               default_steps=1, default_guidance=1.0)

    @classmethod
    def sdxl_turbo(cls) -> "StableDiffusionConfig":
        """SDXL-Turbo  [Sauer et al. 2023]: SDXL base 1.0 distilled the same way, trained at 512² (its UNet's
        sample_size is 64). stabilityai/sdxl-turbo ships an EulerAncestralDiscreteScheduler with "trailing" spacing;
        diffusers' docs sample it with 1–4 steps and guidance_scale=0.0."""
        return cls.sdxl().with_(spacing="trailing", size=512, distilled="turbo", default_sampler="euler_a",
                                default_steps=1, default_guidance=1.0)

    def with_(self, **changes) -> "StableDiffusionConfig":
        """Replace fields; ``SamplingConfig`` fields (prediction, spacing …) may be given directly."""
        sampling = {k: changes.pop(k) for k in list(changes) if k in SAMPLING_FIELDS}
        if sampling:
            changes["sampling"] = changes.get("sampling", self.sampling).with_(**sampling)
        return replace(self, **changes)

    @property
    def prediction(self) -> Prediction:
        return self.sampling.prediction

    @property
    def inpainting(self) -> bool:
        return self.unet.in_channels == self.vae.latent_channels * 2 + 1


# The named presets ``load_pipeline(..., preset=)`` takes for a checkpoint whose weights look like their teacher's.
PRESETS = {"sd-turbo": StableDiffusionConfig.sd_turbo, "sdxl-turbo": StableDiffusionConfig.sdxl_turbo}
TURBO = {"sd2": "sd-turbo", "sdxl": "sdxl-turbo"}  # family → its Turbo preset, for a name that says "turbo"
# diffusers scheduler classes → ldm's samplers: a distilled folder's default sampler is the scheduler it ships
SHIPPED_SAMPLERS = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a"}
DEFAULT_FIELDS = ("distilled", "default_sampler", "default_steps", "default_guidance")


def check_preset(preset: str | None) -> None:
    """Refuse an unknown preset name before anything is loaded ("none": detect nothing, not even from the name)."""
    if preset is not None and preset != "none" and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}, none")


def turbo_scheduler(scheduler_class: str | None, sampling: SamplingConfig) -> bool:
    """Whether a diffusers folder's scheduler is the one SD-Turbo and SDXL-Turbo ship: an Euler scheduler with
    "trailing" spacing, ε-prediction and SD's ordinary schedule (a zero-terminal-SNR model also uses "trailing",
    with v-prediction and rescaled betas; ordinary SD folders use "leading" or leave it to the class)."""
    return scheduler_class in SHIPPED_SAMPLERS and sampling.spacing == "trailing" and sampling.prediction == "eps" \
        and not sampling.schedule.zero_terminal_snr


def choose_preset(config: StableDiffusionConfig, preset: str | None, names: Sequence[str] = (),
                  scheduler_class: str | None = None, source: str = "checkpoint",
                  keep_sampling: bool = False) -> tuple[StableDiffusionConfig, str | None]:
    """(config, note): the detected ``config`` as a distilled preset — the caller's ``preset``, else the Turbo of
    its family when one of ``names`` (a file or folder name, a hub repository) contains "turbo" or when
    ``scheduler_class`` and the config's sampling are a Turbo folder's (``turbo_scheduler``) — and the note saying
    which and why (None: no preset; ``preset="none"`` turns detection off).

    The architecture stays the checkpoint's; the preset brings its sampling defaults and, unless
    ``keep_sampling`` (a diffusers folder's own scheduler config and size win), its scheduler settings and size.
    A preset of another family than the checkpoint's is refused, naming both."""
    if preset == "none":
        return config, None
    if preset is not None:
        check_preset(preset)
        why = "set by the caller"
    elif config.family not in TURBO:
        return config, None
    elif hint := next((n for n in names if "turbo" in n.lower()), None):
        preset, why = TURBO[config.family], f"\"turbo\" in the name {hint!r}"
    elif turbo_scheduler(scheduler_class, config.sampling):
        preset, why = TURBO[config.family], f"the folder ships {scheduler_class} with trailing timesteps, as Turbo does"
    else:
        return config, None
    target = PRESETS[preset]()
    if target.family != config.family:
        raise ValueError(f"preset {preset!r} is for the {target.family} family, but {source} holds a {config.family} model")
    changes = {name: getattr(target, name) for name in DEFAULT_FIELDS}
    if keep_sampling:
        changes["default_sampler"] = SHIPPED_SAMPLERS.get(scheduler_class, target.default_sampler)
    else:
        changes |= dict(sampling=target.sampling, size=target.size)
    scale = changes["default_guidance"]
    guidance = "no guidance" if scale is not None and scale <= 1 else f"guidance {scale}"
    defaults = f"{changes['default_steps']} step(s) of {changes['default_sampler']}, {guidance}"
    return config.with_(**changes), f"preset: {preset} ({why}): {defaults} by default"
