"""Stable Diffusion: text-to-image, image-to-image and inpainting from a latent diffusion model  [Rombach et al. 2022].

    prompt ─prompts, tokenizer (weights, 75-token chunks)─► ids (B, K, 77) ─text_encoder─► context (B, K·77, D)
    noise (B, 4, H/8, W/8) ─sampler ⟲ unet(z_t, t, context), classifier-free guided─► z_0 ─vae.decode(z_0 / s)─► image

Composes the pieces; the maths lives in ``samplers``, ``unet``, ``vae``, ``text_encoder``, and what both pipelines
share (sampling settings, the guided denoiser over a ``Conditioning``, the img2img start) in ``sampling.Pipeline``.
Latents stay in float32 between steps whatever the weights' dtype; the UNet sees them in its own dtype.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Iterator, Sequence
import warnings

import torch
from PIL import Image

from .adapters import Adaptable
from .sd_stages import ImageInput, Prompt, StagedRuns, check_refiner
from .attention import set_attention_chunk
from .blocks import guidance_scale_embedding
from .conditioning import Conditioning
from .perf import enable_fast_cpu
from .samplers import StepRecord, get_sampler, randn, resolve_sampler
from .samplers.common import Generators
from .sampling import Output, Pipeline, SamplingConfig, generators
from .schedule import NoiseSchedule
from .sd_config import StableDiffusionConfig
from .prompts import count_chunks, emphasize, parse_prompt, prompt_tokens
from .text_encoder import TextEncoder, clip_skip_layer
from .tokenizer import CLIPTokenizer
from .unet import UNet
from .vae import AutoencoderKL, check_tile


class StableDiffusion(StagedRuns, Adaptable, Pipeline):
    """Tokenizer, text encoder, UNet, VAE and noise schedule, each usable on its own:
    ``pipe.unet(z_t, t, context)``, ``pipe.vae.decode(z)``, ``pipe.text_encoder(ids)``, ``pipe.tokenizer(texts)``.
    ``notes`` say how the loader decided what the checkpoint does not say (e.g. ε or v)."""

    @property
    def default_sampler(self) -> str:
        """The sampler ``loop`` runs when not told: the model's (``config.default_sampler``: a distilled model's), else
        DPM++ 2M."""
        return self.config.default_sampler or "dpm++2m"

    @property
    def default_steps(self) -> int:
        """The model's number of steps (``config.default_steps``: 1 for Turbo), else 25."""
        return self.config.default_steps or 25

    @property
    def default_guidance(self) -> float:
        """The model's guidance scale (``config.default_guidance``: 1, off, for Turbo), else 7.5."""
        return 7.5 if self.config.default_guidance is None else self.config.default_guidance

    def guidance(self, guidance_scale: float | None) -> float:
        """The classifier-free guidance scale ``loop`` runs for ``guidance_scale`` (None: ``default_guidance``). A scale
        ≤ 1 is no guidance, as diffusers reads it (``guidance_scale > 1`` guides): 1, so the UNet sees the prompt
        batch alone — 0 too, which ``DiffusionPipeline`` reads as unconditional sampling. An LCM-distilled UNet
        reads the scale itself (``condition``), so it keeps it."""
        scale = self.default_guidance if guidance_scale is None else guidance_scale
        return 1.0 if scale <= 1.0 and self.unet.config.time_cond_proj_dim is None else scale

    def __init__(self, tokenizer: CLIPTokenizer | None, text_encoder: TextEncoder | None, unet: UNet, vae: AutoencoderKL,
                 config: StableDiffusionConfig, tokenizer_2: CLIPTokenizer | None = None,
                 text_encoder_2: TextEncoder | None = None, notes: Sequence[str] = ()):
        if (config.text_2 is None) != (text_encoder_2 is None) or (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("a second text encoder and tokenizer go together with config.text_2 (SDXL), or none of them")
        if (config.text is None) != (text_encoder is None) or (text_encoder is None) != (tokenizer is None) or \
                (text_encoder is None and text_encoder_2 is None):
            raise ValueError("a text encoder and tokenizer go together with config.text, or none of them when there is "
                             "a second (the SDXL refiner)")
        pairs = {"unet": (unet.config, config.unet), "vae": (vae.config, config.vae)}
        if text_encoder is not None:
            pairs["text"] = (text_encoder.config, config.text)
        if text_encoder_2 is not None:
            pairs["text_2"] = (text_encoder_2.config, config.text_2)
        for name, (built, said) in pairs.items():
            if built != said:  # the schedule, sizes and loaders read the config, the computation uses the module
                diff = [f"{f.name}={getattr(said, f.name)!r} (module: {getattr(built, f.name)!r})"
                        for f in fields(said) if getattr(said, f.name) != getattr(built, f.name)]
                raise ValueError(f"config.{name} does not describe the {name} module passed in: {', '.join(diff)}")
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self._config = config
        super().__init__(config.sampling)
        for model in self.models:
            enable_fast_cpu(model.eval())
        self.vae_tile: int | None = None  # see enable_vae_tiling
        self.tiny_decoder = None  # see use_tiny_decoder
        self.notes: list[str] = list(notes)
        self.prompt_syntax = True  # A1111's weights, BREAK and long prompts (see embed_prompts); False: diffusers'

    @property
    def config(self) -> StableDiffusionConfig:
        return self._config

    @config.setter
    def config(self, config: StableDiffusionConfig) -> None:
        """Replacing the config (e.g. ``pipe.config = pipe.config.with_(spacing="trailing")``) rebuilds the schedule."""
        self._config, self.schedule = config, NoiseSchedule(config.sampling.schedule)

    @property
    def sampling(self) -> SamplingConfig:
        return self._config.sampling

    @sampling.setter
    def sampling(self, sampling: SamplingConfig) -> None:
        self.config = self._config.with_(sampling=sampling)

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.unet, self.vae) if m is not None]

    @property
    def lora_models(self) -> dict[str, torch.nn.Module]:
        return {k: m for k, m in (("unet", self.unet), ("text_encoder", self.text_encoder),
                                  ("text_encoder_2", self.text_encoder_2)) if m is not None}

    @property
    def lora_family(self) -> str:
        return self.config.family.split("-")[0]

    def load_embedding(self, path: str, token: str | None = None) -> list[str]:
        """Add the textual-inversion embedding at ``path`` (str or Path)  [Gal et al. 2022] — A1111 ``.pt``, kohya or
        diffusers ``.safetensors``, diffusers ``learned_embeds.bin``; SDXL's clip_l + clip_g — to every text encoder
        under ``token`` (default: the file's stem, or the token a diffusers file names; ``ldm.embeddings``).
        Returns the names a prompt can use: ``token`` (all n vectors), ``token_1`` … ``token_{n−1}`` (one each).
        ``unload_embeddings`` forgets them."""
        from .embeddings import add_embedding, read_embedding

        encoders = {"text_encoder": (self.tokenizer, self.text_encoder),
                    "text_encoder_2": (self.tokenizer_2, self.text_encoder_2)}
        return add_embedding(read_embedding(path), encoders, self.config.family, token)

    def unload_embeddings(self) -> None:
        """Forget every embedding ``load_embedding`` added."""
        from .embeddings import remove_embeddings

        remove_embeddings({"text_encoder": (self.tokenizer, self.text_encoder),
                           "text_encoder_2": (self.tokenizer_2, self.text_encoder_2)})

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

    def use_tiny_decoder(self, taesd) -> None:
        """Decode the final images with TAESD (an ``ldm.taesd.AutoencoderTiny``, or a path ``ldm.convert.load_taesd``
        reads) instead of the VAE: at 512² about 40× less work, for images a little softer in fine texture. The
        TAESD must be made for this model's latent space (taesd for SD 1/2, taesdxl for SDXL). None: the VAE again."""
        if taesd is not None:
            from .convert.taesd import check_latent_space, load_taesd

            taesd = load_taesd(taesd) if not isinstance(taesd, torch.nn.Module) else taesd
            check_latent_space(taesd, self.config.family)
            taesd.eval()
            if taesd.config.downsample_factor != self.vae.config.downsample_factor:
                raise ValueError(f"{taesd.source} upsamples by {taesd.config.downsample_factor}, but this model's VAE "
                                 f"by {self.vae.config.downsample_factor}: its images would be another size")
            taesd.to(self.device)
        self.tiny_decoder = taesd

    def preview_options(self) -> dict:
        """Latents preview through the family's published linear factors, its TAESD, or the VAE itself."""
        # published factors and TAESDs exist for SD's 4-channel latents; a toy text-to-image model's preview is its VAE
        family = self.config.family if self.vae.config.latent_channels == 4 else None
        return dict(factor=self.vae.config.downsample_factor, family=family, full=self.vae_decode)

    # --- text → context ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: Prompt, clip_skip: int = 1) -> torch.Tensor:
        """Prompts → the hidden states the UNet cross-attends to, (B, K·77, D) (see ``embed_prompts``)."""
        return self.embed_prompts(prompts, clip_skip)[0]

    @torch.inference_mode()
    def embed_prompts(self, prompts: Prompt, clip_skip: int = 1,
                      chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts → (context (B, K·77, D), pooled (B, P) or None). SDXL concatenates its two encoders' states
        along D and pools with the second one; the refiner has only the second.

        With ``prompt_syntax`` (the default) a prompt is read in A1111's syntax (``ldm.prompts``): (weights),
        [weights], (text:w), BREAK, and K ≥ ``chunks`` chunks of 75 tokens, each encoded as a prompt of its own
        and weighted, the contexts joined along the sequence; SDXL's pooled output is the first chunk's, as A1111
        takes it. Without it K = 1: brackets are text and the prompt is cut at 77 tokens, with a warning, as
        diffusers reads it. A prompt of ≤ 75 tokens with no brackets or BREAK has the same context either way.
        ``clip_skip`` k takes the states of the block k − 1 before the model's own, for each encoder
        (``ldm.text_encoder.clip_skip_layer``: A1111's CLIP skip for SD 1, diffusers' clip_skip + 1 everywhere).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # the words as the encoder will read them: weights and BREAKs are syntax, not words
        texts = [" ".join(text for text, weight in parse_prompt(p) if weight >= 0) for p in prompts] \
            if self.prompt_syntax else prompts
        for tokenizer in (self.tokenizer, self.tokenizer_2):
            if tokenizer is not None:
                tokenizer.check_prompts(texts)
        chunks = max(chunks, self.chunk_count(prompts))
        with self._autocast():
            contexts, pooled = [], None
            if self.text_encoder is not None:
                contexts.append(self._encode(self.tokenizer, self.text_encoder, prompts, clip_skip, chunks, pooled=False)[0])
            if self.text_encoder_2 is not None:
                second, pooled = self._encode(self.tokenizer_2, self.text_encoder_2, prompts, clip_skip, chunks,
                                              pooled=True)
                contexts.append(second)
            return torch.cat(contexts, dim=-1).to(self.dtype), None if pooled is None else pooled.to(self.dtype)

    def chunk_count(self, prompts: list[str]) -> int:
        """How many 77-token chunks the longest of the prompts takes, by either tokenizer (1 without
        ``prompt_syntax``)."""
        if not self.prompt_syntax:
            return 1
        return max(count_chunks(prompts, t) for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    def _encode(self, tokenizer: CLIPTokenizer, encoder: TextEncoder, prompts: list[str], clip_skip: int, chunks: int,
                pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder's context (B, K·77, D) and, if asked, its pooled output (B, P) of the first chunk."""
        layer = clip_skip_layer(encoder.config, clip_skip)
        if not self.prompt_syntax:
            ids, weights = tokenizer(prompts)[:, None], None
        else:
            ids, weights = prompt_tokens(prompts, tokenizer, chunks)
        flat = ids.flatten(0, 1).to(self.device)  # every chunk of every prompt: one batch through the encoder
        if pooled:
            out = encoder.encode(flat, layer)
            hidden, first = out.hidden, out.pooled.unflatten(0, ids.shape[:2])[:, 0]
        else:  # forward runs only the blocks the context needs
            hidden, first = encoder(flat, layer), None
        hidden = hidden.unflatten(0, ids.shape[:2])
        if weights is not None:
            hidden = emphasize(hidden, weights)
        return hidden.flatten(1, 2), first

    def _prompts(self, prompt: Prompt, negative_prompt: Prompt | None, n: int) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"empty prompt in {prompts!r}: describe the image (use negative_prompt for what to avoid)")
        negatives = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
            else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return [p for p in prompts for _ in range(n)], [p for p in negatives for _ in range(n)]

    def latent_shape(self, n: int, width: int, height: int) -> tuple[int, int, int, int]:
        f = self.vae.config.downsample_factor
        if width % f or height % f or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {f} (the VAE's factor), got {width}×{height}")
        return (n, self.vae.config.latent_channels, height // f, width // f)

    def condition(self, prompts: list[str], negatives: list[str] | None, guidance_scale: float, width: int,
                  height: int, clip_skip: int = 1, aesthetic_score: float = 6.0,
                  negative_aesthetic_score: float = 2.5) -> tuple[Conditioning, Conditioning | None]:
        """The prompts as a ``Conditioning`` and, when guided, the negative prompts' (``negatives`` None: an all-zero
        unconditional context, SDXL's ``force_zeros_for_empty_prompt``), both with as many 77-token chunks as the
        longest of either takes (the shorter padded with empty chunks, as A1111 does). SDXL's size ids  [Podell et
        al. 2023, §2.2] — original size, crop corner, target size — are the same in both; the refiner's (§2.5) end
        in an aesthetic score instead, high for the prompt and low for the negative, so guidance steers away from
        low-rated images. An LCM-distilled UNet (``time_cond_proj_dim``) is not guided: it reads the scale as the
        w-embedding of w = guidance_scale − 1 (``timestep_cond``; diffusers' LatentConsistencyModelPipeline, whose
        ε_∅ + s·(ε_c − ε_∅) is the paper's ε_c + w·(ε_c − ε_∅)  [Luo et al. 2023, §4.2]), so no negatives."""
        lcm_dim = self.unet.config.time_cond_proj_dim
        guided = guidance_scale != 1.0 and lcm_dim is None
        chunks = self.chunk_count(prompts + (negatives or []) if guided else prompts)
        context, pooled = self.embed_prompts(prompts, clip_skip, chunks)

        def size_ids(score: float) -> torch.Tensor | None:
            if not self.unet.config.added_cond_dim:
                return None
            last = [score] if self.config.requires_aesthetics_score else [height, width]
            ids = torch.tensor([[height, width, 0, 0, *last]], device=self.device, dtype=self.dtype)
            return ids.expand(len(prompts), -1)

        w = None if lcm_dim is None else guidance_scale_embedding(
            torch.full((len(prompts),), guidance_scale - 1.0), lcm_dim).to(self.device, self.dtype)
        cond = Conditioning(context=context, pooled=pooled, size_ids=size_ids(aesthetic_score), timestep_cond=w)
        if not guided:
            return cond, None
        if negatives is None:
            context, pooled = torch.zeros_like(context), None if pooled is None else torch.zeros_like(pooled)
        else:
            context, pooled = self.embed_prompts(negatives, clip_skip, chunks)
        return cond, Conditioning(context=context, pooled=pooled, size_ids=size_ids(negative_aesthetic_score))

    @torch.inference_mode()
    def loop(self, prompt: Prompt, negative_prompt: Prompt | None = None, *, width: int | None = None,
             height: int | None = None, num_inference_steps: int | None = None, guidance_scale: float | None = None,
             sampler: str | None = None, seed: int | torch.Generator = 0, seeds: Sequence[int] | None = None,
             num_images_per_prompt: int = 1, strength: float = 1.0, image: ImageInput | None = None,
             mask: ImageInput | None = None, x_T: torch.Tensor | None = None, guidance_rescale: float = 0.0,
             clip_skip: int = 1, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
             preview="auto", **options) -> Iterator[StepRecord]:
        """The reverse process as a generator of per-step records (latents, x̂_0) — ``__call__`` runs it to the end.

        ``image`` with ``strength`` < 1 is image-to-image (SDEdit  [Meng et al. 2022]); ``image`` with ``mask``
        (white = repaint) is inpainting (``inpaint``); width and height default to the image's, else the model's
        training size. Image k (of prompts × num_images_per_prompt, prompt-major) is seeded ``seeds[k]``, else
        ``seed + k``: its CPU generator draws its VAE posterior sample (img2img) and then its x_T, in diffusers'
        order, so seeds match its images (diffusers given a list of generators). ``guidance_rescale`` (φ, e.g. 0.7
        for zero-terminal-SNR v-models) tempers strong guidance. ``clip_skip`` k reads the text encoders k − 1
        blocks early (``embed_prompts``). ``aesthetic_score`` and ``negative_aesthetic_score`` are the SDXL refiner's
        (``condition``; other models have no such input). ``options`` go to the sampler. ``sampler``,
        ``num_inference_steps`` and ``guidance_scale`` default to the model's (``default_sampler``, ``guidance`` …).
        Each record's ``preview`` (computed when read) is x̂_0 as an image, made the ``preview`` way: "auto" / "linear"
        (the family's latent → RGB factors), "tiny:PATH" or an ``AutoencoderTiny`` (TAESD), "full" (``previewer``).
        """
        guidance_scale = self.guidance(guidance_scale)
        sampler, steps = sampler or self.default_sampler, num_inference_steps or self.default_steps
        self.check_request(sampler, image, mask)
        loop = get_sampler(sampler)
        prompts, negatives = self._prompts(prompt, negative_prompt, num_images_per_prompt)
        default_w, default_h = _size(image) if image is not None else (self.config.size, self.config.size)
        width, height = width or default_w, height or default_h
        shape = self.latent_shape(len(prompts), width, height)
        g = generators(len(prompts), seed, seeds)
        zero_uncond = self.config.zero_uncond and negative_prompt is None
        cond, uncond = self.condition(prompts, None if zero_uncond else negatives, guidance_scale, width, height,
                                      clip_skip, aesthetic_score, negative_aesthetic_score)
        # an ordinary (4-channel) UNet repaints by putting the known region back after every step (``repaint``)
        blend = mask is not None and not self.config.inpainting
        # diffusers' order of draws: the image's posterior sample, ε, then the masked image's posterior sample
        if image is not None and (strength < 1 or blend):
            z0 = self.encode(self.image_tensor(image, width, height), g)
        else:
            z0 = None
        noise = (randn(shape, g, self.device) if x_T is None else x_T) if blend else None
        x_T, kwargs = self.start(sampler, steps, options, shape, g, x_T, z0, strength, noise)
        if mask is not None and not blend:
            extra = self.inpainting_channels(image, mask, shape, g)
            cond, uncond = replace(cond, concat=extra), None if uncond is None else replace(uncond, concat=extra)
        records = loop(self.denoiser(guidance_scale, uncond, guidance_rescale), self.schedule, x_T, cond=cond,
                       generator=g, num_inference_steps=steps, **kwargs)
        if blend:
            randn(shape, g, "cpu")  # diffusers encodes the masked image for a 4-channel UNet too, unused: same draws
            records = self.repaint(records, z0, noise, self.masks(mask, shape)[1], self.levels(sampler, steps, kwargs))
        yield from self.with_previews(records, preview)

    def check_request(self, sampler: str, image: ImageInput | None, mask: ImageInput | None) -> None:
        """Refuse what this model cannot do (inpainting without a mask or an image); warn of the LCM sampler on a
        model that was not distilled for it."""
        if self.config.inpainting and mask is None:
            raise ValueError("this is an inpainting model: pass image= and mask= (or use pipe.inpaint)")
        if mask is not None and image is None:
            raise ValueError("inpainting needs an image as well as a mask")
        if resolve_sampler(sampler)[0] == "lcm" and self.unet.config.time_cond_proj_dim is None and not self.loras:
            warnings.warn("the LCM sampler expects an LCM-distilled model or an LCM-LoRA (pipe.load_lora); this UNet "
                          "is neither, and its few-step images will be blurred or noisy", stacklevel=3)

    def __call__(self, prompt: Prompt, negative_prompt: Prompt | None = None, *, refiner: StableDiffusion | None = None,
                 refine_from: float = 0.8, progress: bool = True, output: Output = "pil",
                 **options) -> list[Image.Image] | torch.Tensor:
        """Text (and optionally image) to images: one per prompt × num_images_per_prompt, as PIL images (or one
        tensor in [−1, 1] with ``output="tensor"``).

        Options as in ``loop``: width, height (multiples of 8), num_inference_steps, guidance_scale,
        guidance_rescale, clip_skip, sampler ("dpm++2m", "euler_a", "euler", "ddim", "ddpm"), seed or seeds,
        num_images_per_prompt, image + strength (img2img), image + mask (inpainting), x_T. With an SDXL
        ``refiner`` this model runs the first ``refine_from`` of the denoising and the refiner the rest
        (``denoise_until``, ``refine``), with the same options.
        """
        if refiner is not None:
            check_refiner(refiner)
            latents = self.denoise_until(refine_from, prompt, negative_prompt, progress=progress, **options)
            return refiner.refine(latents, prompt, negative_prompt, refine_from=refine_from, progress=progress,
                                  output=output, **options)
        total = self.steps_run(options.get("num_inference_steps"), options.get("strength", 1.0), options.get("image"))
        return self.run(self.loop(prompt, negative_prompt, **options), total, progress, output)

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
    def encode(self, images: torch.Tensor, generator: Generators = None, tile: int | None = None) -> torch.Tensor:
        """Images in [−1, 1] → scaled latents s·z, z sampled from the VAE posterior (its mean without a generator);
        in tiles of ``tile`` latent pixels, by default those of ``enable_vae_tiling``. A list of generators encodes
        one image per generator (one image is repeated), each sampled from its own, as diffusers does."""
        if isinstance(generator, list):
            images = images.expand(len(generator), -1, -1, -1)
            return torch.cat([self.encode(x[None], g, tile) for x, g in zip(images, generator)])
        posterior = self.vae.encode(images.to(self.vae_dtype), tile=self.vae_tile if tile is None else tile)
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return z.float() * self.vae.config.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Scaled latents → images in [−1, 1], through the tiny decoder if ``use_tiny_decoder`` set one, else the VAE
        (``vae_decode``)."""
        if self.tiny_decoder is not None:
            taesd = self.tiny_decoder
            return taesd.decode(latents.to(next(taesd.parameters()).dtype)).float().clamp(-1, 1)
        return self.vae_decode(latents, tile)

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Scaled latents → images in [−1, 1] through the VAE; ``tile`` (in latent pixels) decodes large images piece
        by piece, by default in the tiles of ``enable_vae_tiling`` (none unless it was called)."""
        z = (latents / self.vae.config.scaling_factor).to(self.vae_dtype)
        return self.vae.decode(z, tile=self.vae_tile if tile is None else tile).float().clamp(-1, 1)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype



def _size(image: ImageInput) -> tuple[int, int]:
    return image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
