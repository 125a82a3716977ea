"""The Stable Diffusion families: everything that defines a model apart from its weights, with presets.

The checkpoint loader (``sd_checkpoint``) detects which of these a file holds; the pipeline
(``stable_diffusion``) is built from one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from .diffusion import Prediction
from .sampling import SamplingConfig
from .text_encoder import TextEncoderConfig
from .unet import UNetConfig
from .vae import VAEConfig

SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}


@dataclass(frozen=True)
class StableDiffusionConfig:
    """Everything that defines a Stable Diffusion model apart from its weights, and how it is sampled.

    ``sampling`` holds the diffusers scheduler settings the checkpoint ships with (schedule, ε or v, timestep
    spacing …; ``ldm.sampling.SamplingConfig``): they pick the sampler's timesteps, so matching them gives the
    same image. ``with_`` takes its fields directly: ``config.with_(prediction="eps", spacing="trailing")``.
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
