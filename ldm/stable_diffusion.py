"""Stable Diffusion: text-to-image, image-to-image and inpainting from a latent diffusion model  [Rombach et al. 2022].

    prompt ─tokenizer─► ids (B, 77) ─text_encoder─► context (B, 77, D)
    noise (B, 4, H/8, W/8) ─sampler ⟲ unet(z_t, t, context), classifier-free guided─► z_0 ─vae.decode(z_0 / s)─► image

Composes the pieces; the maths lives in ``samplers``, ``unet``, ``vae``, ``text_encoder``. Latents stay in
float32 between steps whatever the weights' dtype; the UNet sees them in its own dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .attention import set_attention_chunk
from .diffusion import Prediction, q_sample
from .images import to_uint8
from .samplers import DEFAULT_SPACING, StepRecord, classifier_free_guidance, get_sampler, randn, sampler_timesteps
from .schedule import NoiseSchedule, ScheduleConfig, Spacing
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig, check_tile

Prompt = str | Sequence[str]
ImageInput = Image.Image | torch.Tensor


@dataclass(frozen=True)
class StableDiffusionConfig:
    """Everything that defines a Stable Diffusion model apart from its weights, and how it is sampled.

    ``spacing``, ``steps_offset`` and ``set_alpha_to_one`` are the diffusers scheduler settings the
    checkpoint ships with: they pick the sampler's timesteps, so matching them gives the same image.
    ``spacing=None`` (a config without ``timestep_spacing``, like SD 1.5's) means each sampler's own
    default, as diffusers' scheduler classes have: "leading" for DDIM/DDPM, "linspace" for DPM-Solver and Euler.
    """

    unet: UNetConfig
    vae: VAEConfig = field(default_factory=VAEConfig.sd)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig.clip_vit_l14)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig.stable_diffusion)
    prediction: Prediction = "eps"
    spacing: Spacing | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    pad: Literal["eos", "zero"] = "eos"
    family: str = "sd1"
    size: int = 512  # the image side the model was trained at: the default width and height
    text_2: TextEncoderConfig | None = None  # SDXL's second text encoder (OpenCLIP bigG), padded with zeros
    zero_uncond: bool = False  # no negative prompt → an all-zero unconditional context (SDXL's force_zeros_for_empty_prompt)

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
                   pad="zero", prediction=prediction, family="sd2-inpainting" if in_channels == 9 else "sd2",
                   size=768 if prediction == "v" else 512)

    @classmethod
    def sdxl(cls) -> "StableDiffusionConfig":
        """SDXL base 1.0  [Podell et al. 2023]: two text encoders (CLIP ViT-L and OpenCLIP bigG, penultimate layers
        without the final LayerNorm, concatenated into a 2048-wide context; bigG's pooled, projected output and the
        image size enter the UNet's time embedding), a 3-level UNet with 1/2/10-deep transformers, 1024² images."""
        return cls(unet=UNetConfig.sdxl(), vae=VAEConfig.sd().with_(scaling_factor=0.13025),
                   text=TextEncoderConfig.clip_vit_l14_sdxl(), text_2=TextEncoderConfig.openclip_vit_bigg14(),
                   spacing="leading", zero_uncond=True, family="sdxl", size=1024)

    def with_(self, **changes) -> "StableDiffusionConfig":
        return replace(self, **changes)

    @property
    def inpainting(self) -> bool:
        return self.unet.in_channels == self.vae.latent_channels * 2 + 1


class StableDiffusion:
    """Tokenizer, text encoder, UNet, VAE and noise schedule, each usable on its own:
    ``pipe.unet(z_t, t, context)``, ``pipe.vae.decode(z)``, ``pipe.text_encoder(ids)``, ``pipe.tokenizer(texts)``."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: TextEncoder, unet: UNet, vae: AutoencoderKL,
                 config: StableDiffusionConfig, tokenizer_2: CLIPTokenizer | None = None,
                 text_encoder_2: TextEncoder | None = None):
        if (config.text_2 is None) != (text_encoder_2 is None) or (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("a second text encoder and tokenizer go together with config.text_2 (SDXL), or none of them")
        pairs = {"unet": (unet.config, config.unet), "vae": (vae.config, config.vae), "text": (text_encoder.config, config.text)}
        if text_encoder_2 is not None:
            pairs["text_2"] = (text_encoder_2.config, config.text_2)
        for name, (built, said) in pairs.items():
            if built != said:  # the schedule, sizes and loaders read the config, the computation uses the module
                diff = [f"{f.name}={getattr(said, f.name)!r} (module: {getattr(built, f.name)!r})"
                        for f in fields(said) if getattr(said, f.name) != getattr(built, f.name)]
                raise ValueError(f"config.{name} does not describe the {name} module passed in: {', '.join(diff)}")
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.config = config
        for model in self.models:
            model.eval()
        self.autocast: torch.dtype | None = None  # e.g. torch.bfloat16: run the UNet under autocast
        self.vae_tile: int | None = None  # see enable_vae_tiling
        self.notes: list[str] = []  # how the loader decided what the checkpoint does not say (e.g. ε or v)

    @property
    def config(self) -> StableDiffusionConfig:
        return self._config

    @config.setter
    def config(self, config: StableDiffusionConfig) -> None:
        """Replacing the config (e.g. ``pipe.config = pipe.config.with_(spacing="trailing")``) rebuilds the schedule."""
        self._config, self.schedule = config, NoiseSchedule(config.schedule)

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> "StableDiffusion":
        """Load a single-file checkpoint (.safetensors / .ckpt) or a diffusers folder; see ``sd_checkpoint.load_pipeline``."""
        from .sd_checkpoint import load_pipeline

        return load_pipeline(path, **options)

    # --- placement ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.unet, self.vae) if m is not None]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        """Move the models; ``dtype`` applies to the text encoders and UNet. The VAE stays in float32 when
        asked for float16: its decoder's activations overflow fp16's range (diffusers' ``force_upcast``)."""
        for model in self.models[:-1]:
            model.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=torch.float32 if dtype == torch.float16 else dtype)
        return self

    def enable_attention_slicing(self, chunk: int | None = 1024) -> None:
        """Attend ``chunk`` image positions at a time in the UNet and VAE (None turns it off): same images,
        less peak memory on backends whose attention materialises the score matrix."""
        for model in (self.unet, self.vae):
            set_attention_chunk(model, chunk)

    def enable_vae_tiling(self, tile: int | None = 64) -> None:
        """Encode (img2img, inpainting) and decode through the VAE in overlapping tiles of ``tile`` latent
        pixels (tile·8 image pixels for SD's VAE; None turns it off), so the VAE holds the activations of one
        tile, not of the whole image: decoding 1024² in bf16 takes 0.45 GiB beside the weights in 64-tiles
        against 1.6 GiB whole, and the activations grow with the image while a tile's do not. The price is the
        overlaps' extra work (there, 9 tiles cover 2.25× the image) and tiles that are cross-faded, not exact:
        each sees only its own GroupNorm statistics and attention (``ldm.vae.AutoencoderKL.decode``), so keep
        them large — 64 is 512 pixels, the size SD 1.x was trained at."""
        check_tile(tile)
        self.vae_tile = tile

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # --- text → context ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: Prompt) -> torch.Tensor:
        """Prompts → the hidden states the UNet cross-attends to, (B, 77, D)."""
        return self.embed_prompts(prompts)[0]

    @torch.inference_mode()
    def embed_prompts(self, prompts: Prompt) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts → (context (B, 77, D), pooled (B, P) or None). SDXL concatenates its two encoders' states
        along D and pools with the second one."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._autocast():
            context = self.text_encoder(self.tokenizer(prompts).to(self.device))
            if self.text_encoder_2 is None:
                return context.to(self.dtype), None
            second = self.text_encoder_2.encode(self.tokenizer_2(prompts).to(self.device))
            return torch.cat([context, second.hidden], dim=-1).to(self.dtype), second.pooled.to(self.dtype)

    def _prompts(self, prompt: Prompt, negative_prompt: Prompt | None, n: int) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"empty prompt in {prompts!r}: describe the image (use negative_prompt for what to avoid)")
        negatives = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
            else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return [p for p in prompts for _ in range(n)], [p for p in negatives for _ in range(n)]

    # --- the denoiser the samplers run -----------------------------------------------------------
    def denoiser(self, uncond: torch.Tensor | None, guidance: float, extra: torch.Tensor | None = None,
                 guidance_rescale: float = 0.0, pooled: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 size_ids: torch.Tensor | None = None):
        """The UNet as a sampler model: in its dtype (and autocast), with the inpainting channels appended
        (``extra``), SDXL's pooled text and size conditioning (``pooled`` = (conditional, unconditional),
        ``size_ids``), guided by ``uncond`` at scale ``guidance`` when it is not 1."""

        def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]  # classifier-free guidance runs [conditional; unconditional] as one batch
            if extra is not None:
                x = torch.cat([x, extra.repeat(n // extra.shape[0], 1, 1, 1)], dim=1)
            added = {}
            if pooled is not None:
                vectors = pooled[0] if n == pooled[0].shape[0] else torch.cat(pooled)
                added = dict(pooled=vectors, size_ids=size_ids.repeat(n // size_ids.shape[0], 1))
            with self._autocast():
                return self.unet(x.to(self.dtype), t, context, **added).float()

        return unet if guidance == 1.0 else classifier_free_guidance(unet, guidance, uncond, guidance_rescale)

    def sampler_options(self, sampler: str) -> dict:
        """The checkpoint's scheduler settings in the form each sampler takes them."""
        c = self.config
        options = dict(spacing=c.spacing or DEFAULT_SPACING[sampler], steps_offset=c.steps_offset, prediction=c.prediction)
        if sampler == "ddim":
            options["final_alpha_bar"] = None if c.set_alpha_to_one else float(self.schedule.alpha_bar_f64[0])
        if sampler == "ddpm":
            options["clip_x0"] = False
        return options

    def latent_shape(self, n: int, width: int, height: int) -> tuple[int, int, int, int]:
        f = self.vae.config.downsample_factor
        if width % f or height % f or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {f} (the VAE's factor), got {width}×{height}")
        return (n, self.vae.config.latent_channels, height // f, width // f)

    @torch.inference_mode()
    def loop(self, prompt: Prompt, negative_prompt: Prompt | None = None, *, width: int | None = None, height: int | None = None,
             num_inference_steps: int = 25, guidance_scale: float = 7.5, sampler: str = "dpm++2m",
             seed: int | torch.Generator = 0, num_images_per_prompt: int = 1, strength: float = 1.0,
             image: ImageInput | None = None, mask: ImageInput | None = None, latents: torch.Tensor | None = None,
             guidance_rescale: float = 0.0, **options) -> Iterator[StepRecord]:
        """The reverse process as a generator of per-step records (latents, x̂_0) — ``__call__`` runs it to the end.

        ``image`` with ``strength`` < 1 is image-to-image (SDEdit  [Meng et al. 2022]); ``image`` with ``mask``
        (white = repaint) is inpainting, with the 9-channel inpainting model. The seed's generator, on the CPU,
        draws the VAE posterior sample (img2img) and then x_T, in diffusers' order, so seeds match its images.
        ``guidance_rescale`` (φ, e.g. 0.7 for zero-terminal-SNR v-models) tempers strong guidance.
        """
        loop = get_sampler(sampler)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        prompts, negatives = self._prompts(prompt, negative_prompt, num_images_per_prompt)
        width, height = width or self.config.size, height or self.config.size
        shape = self.latent_shape(len(prompts), width, height)
        g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        context, pooled = self.embed_prompts(prompts)
        uncond = uncond_pooled = None
        if guidance_scale != 1.0 and self.config.zero_uncond and negative_prompt is None:
            uncond, uncond_pooled = torch.zeros_like(context), torch.zeros_like(pooled) if pooled is not None else None
        elif guidance_scale != 1.0:
            uncond, uncond_pooled = self.embed_prompts(negatives)
        size_ids = None
        if self.unet.config.added_cond_dim:  # SDXL micro-conditioning: original size, crop corner, target size
            size_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        opts = self.sampler_options(sampler) | options
        if self.config.inpainting and mask is None:
            raise ValueError("this is an inpainting model: pass image= and mask= (or use pipe.inpaint)")
        if mask is not None and image is None:
            raise ValueError("inpainting needs an image as well as a mask")
        timesteps = sampler_timesteps(sampler, self.schedule, num_inference_steps, opts["spacing"], opts["steps_offset"])
        if image is not None and strength < 1.0:
            z0 = self.encode(self.image_tensor(image, width, height), g).expand(shape[0], -1, -1, -1)
            timesteps = timesteps[num_inference_steps - int(num_inference_steps * strength):]  # diffusers' rounding
            if len(timesteps) == 0:
                raise ValueError(f"strength {strength} with {num_inference_steps} steps runs no step at all")
            x_T = q_sample(self.schedule, z0, timesteps[:1].expand(shape[0]).to(self.device), randn(shape, g, self.device))
        else:
            x_T = randn(shape, g, self.device) if latents is None else latents.to(self.device, torch.float32)
        extra = None if mask is None else self.inpainting_channels(image, mask, shape, g)
        added = dict(pooled=(pooled, uncond_pooled), size_ids=size_ids) if size_ids is not None else {}
        yield from loop(self.denoiser(uncond, guidance_scale, extra, guidance_rescale, **added), self.schedule, x_T, cond=context,
                        generator=g, timesteps=timesteps, num_inference_steps=num_inference_steps, **opts)

    def __call__(self, prompt: Prompt, negative_prompt: Prompt | None = None, *, progress: bool = True,
                 **options) -> list[Image.Image]:
        """Text (and optionally image) to images: one PIL image per prompt × num_images_per_prompt.

        Options as in ``loop``: width, height (multiples of 8; default the model's training size),
        num_inference_steps, guidance_scale, guidance_rescale, sampler ("dpm++2m", "euler_a", "euler", "ddim",
        "ddpm"), seed, num_images_per_prompt, image + strength (img2img), image + mask (inpainting), latents (x_T).
        """
        record = None
        for record in tqdm(self.loop(prompt, negative_prompt, **options), total=self.steps_run(**options),
                           disable=not progress, desc="denoise"):
            pass
        return self.to_pil(self.decode(record.x_prev))

    @staticmethod
    def steps_run(num_inference_steps: int = 25, strength: float = 1.0, image: ImageInput | None = None, **_) -> int:
        """How many steps ``loop`` runs with these options: img2img runs only the last strength · S."""
        return int(num_inference_steps * strength) if image is not None and strength < 1.0 else num_inference_steps

    def img2img(self, image: ImageInput, prompt: Prompt, *, strength: float = 0.75, **options) -> list[Image.Image]:
        """Redraw ``image`` following ``prompt``: strength 0 keeps it, 1 ignores it."""
        width, height = _size(image)
        return self(prompt, image=image, strength=strength, **{"width": width, "height": height} | options)

    def inpaint(self, image: ImageInput, mask: ImageInput, prompt: Prompt, **options) -> list[Image.Image]:
        """Repaint the white part of ``mask`` (same size as ``image``) following ``prompt``."""
        if not self.config.inpainting:
            raise ValueError(f"inpainting needs an inpainting checkpoint (UNet with {2 * self.vae.config.latent_channels + 1} "
                             f"input channels); this one has {self.config.unet.in_channels}")
        width, height = _size(image)
        return self(prompt, image=image, mask=mask, **{"width": width, "height": height} | options)

    # --- images ↔ latents -------------------------------------------------------------------------
    def image_tensor(self, image: ImageInput, width: int, height: int, channels: int = 3, what: str = "image") -> torch.Tensor:
        """A PIL image or a (B, C, H, W) tensor in [−1, 1] → a float32 tensor on the pipeline's device, checked for size."""
        if isinstance(image, Image.Image):
            image = image.convert("RGB" if channels == 3 else "L")
            array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, channels)
            image = array.permute(2, 0, 1)[None].float() / 127.5 - 1
        if image.dim() != 4 or image.shape[1] != channels:
            raise ValueError(f"expected a {what} tensor of shape (B, {channels}, H, W) in [-1, 1], got {tuple(image.shape)}")
        if image.shape[-2:] != (height, width):
            raise ValueError(f"{what} is {image.shape[-1]}×{image.shape[-2]} but the output is {width}×{height}")
        return image.to(self.device, torch.float32)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, tile: int | None = None) -> torch.Tensor:
        """Images in [−1, 1] → scaled latents s·z, z sampled from the VAE posterior (its mean without a generator);
        in tiles of ``tile`` latent pixels, by default those of ``enable_vae_tiling``."""
        posterior = self.vae.encode(images.to(self.vae_dtype), tile=self.vae_tile if tile is None else tile)
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return z.float() * self.vae.config.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Scaled latents → images in [−1, 1]; ``tile`` (in latent pixels) decodes large images piece by piece,
        by default in the tiles of ``enable_vae_tiling`` (none unless it was called)."""
        z = (latents / self.vae.config.scaling_factor).to(self.vae_dtype)
        return self.vae.decode(z, tile=self.vae_tile if tile is None else tile).float().clamp(-1, 1)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def inpainting_channels(self, image: ImageInput, mask: ImageInput, shape, g: torch.Generator) -> torch.Tensor:
        """The inpainting UNet's extra input: the mask at latent size and the latents of the image with the
        masked part blanked out, (B, 1 + 4, h, w), as diffusers' StableDiffusionInpaintPipeline prepares them."""
        n, _, h, w = shape
        f = self.vae.config.downsample_factor
        pixels = self.image_tensor(image, w * f, h * f)
        m = (self.image_tensor(mask, w * f, h * f, channels=1, what="mask") + 1) / 2
        if m.shape[0] not in (1, n) or pixels.shape[0] not in (1, n):
            raise ValueError(f"got {pixels.shape[0]} images and {m.shape[0]} masks for {n} outputs")
        m = (m >= 0.5).float()
        masked_latents = self.encode(pixels * (m < 0.5), g)
        return torch.cat([F.interpolate(m, size=(h, w)), masked_latents], dim=1).expand(n, -1, -1, -1)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in to_uint8(images)]


def _size(image: ImageInput) -> tuple[int, int]:
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
