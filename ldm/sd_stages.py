"""Stable Diffusion's runs in more than one stage, or around an image: the SDXL refiner's hand-over, the hires fix
and inpainting (the mask, the inpainting UNet's extra channels, and blending the known region back for an ordinary
UNet). ``StagedRuns`` is a part of ``StableDiffusion``: its methods call the pipeline's ``loop``, ``run``, ``encode``
and ``image_tensor``, and ``loop`` calls ``masks``, ``inpainting_channels`` and ``repaint``.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .samplers import StepRecord, resolve_sampler, run_to_end
from .samplers.common import Generators
from .sampling import Output

Prompt = str | Sequence[str]
ImageInput = Image.Image | torch.Tensor


class StagedRuns:
    """Two-stage and image-conditioned runs, mixed into ``StableDiffusion``."""

    def handoff(self, refine_from: float, options: dict) -> tuple[torch.Tensor, int]:
        """(the timesteps of a run with ``options``, k): a two-stage run hands over after the first k steps, those
        at timesteps t ≥ t_c = round(T · (1 − refine_from)), the base denoising from T to t_c and the refiner from
        there — the "ensemble of expert denoisers"  [Podell et al. 2023, §2.5; Balaji et al. 2022], cut where
        diffusers' ``denoising_end`` / ``denoising_start`` cut it, so that the two stages share one schedule."""
        if not 0.0 < refine_from < 1.0:
            raise ValueError(f"refine_from must be in (0, 1) (the fraction of the denoising the base runs), got {refine_from}")
        sampler = options.get("sampler") or self.default_sampler
        steps = options.get("num_inference_steps") or self.default_steps
        if resolve_sampler(sampler, options.get("sigmas"))[1] is not None:
            raise ValueError(f"a two-stage run splits the sampler's timesteps; {sampler!r} with a sigma schedule picks its own")
        timesteps = self.timesteps(sampler, steps, options.get("spacing"))
        T = self.schedule.num_train_timesteps
        k = int((timesteps >= int(round(T - refine_from * T))).sum())
        if not 0 < k < len(timesteps):
            raise ValueError(f"refine_from={refine_from} with {steps} steps leaves one stage no step (timesteps "
                             f"{timesteps.tolist()}); move it or take more steps")
        return timesteps, k

    def denoise_until(self, refine_from: float, prompt: Prompt, negative_prompt: Prompt | None = None, *,
                      progress: bool = True, **options) -> torch.Tensor:
        """The base stage of a two-stage run: text to image stopped after the first ``refine_from`` of the
        denoising (``handoff``); the latents x_t at the hand-over timestep (model space), for ``refine``."""
        if options.get("image") is not None or options.get("x_T") is not None:
            raise ValueError("the base stage of a two-stage run is text-to-image: no image or x_T")
        _, k = self.handoff(refine_from, options)
        records = islice(self.loop(prompt, negative_prompt, **options), k)
        return run_to_end(records, k, progress, "base").x_prev

    def refine(self, image: ImageInput, prompt: Prompt, negative_prompt: Prompt | None = None, *, strength: float = 0.3,
               refine_from: float | None = None, progress: bool = True, output: Output = "pil",
               **options) -> list[Image.Image] | torch.Tensor:
        """The refiner's pass: add detail to ``image`` (PIL, or (B, 3, H, W) in [−1, 1]) by image-to-image at a low
        ``strength`` (diffusers' default 0.3); or, with ``refine_from``, finish latents (B, 4, h, w) that
        ``denoise_until`` stopped part-way, running the timesteps after the hand-over from them as they are.
        Options as for ``__call__`` (aesthetic_score 6 and negative_aesthetic_score 2.5 by default)."""
        if refine_from is None:
            return self(prompt, negative_prompt, image=image, strength=strength, progress=progress, output=output, **options)
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != self.vae.config.latent_channels:
            raise ValueError("refine_from continues latents (B, 4, h, w) from denoise_until; pass an image without it")
        timesteps, k = self.handoff(refine_from, options)
        f = self.vae.config.downsample_factor
        size = dict(width=image.shape[-1] * f, height=image.shape[-2] * f)
        records = self.loop(prompt, negative_prompt, x_T=image, timesteps=timesteps[k:], **(options | size))
        return self.run(records, len(timesteps) - k, progress, output)

    def inpaint(self, image: ImageInput, mask: ImageInput, prompt: Prompt, **options) -> list[Image.Image]:
        """Repaint the white part of ``mask`` (same size as ``image``) following ``prompt``: an inpainting checkpoint
        sees the mask and the masked image; an ordinary one keeps the rest by blending it back at every step
        (``repaint``). ``strength`` < 1 starts from the image noised part-way, as img2img."""
        return self(prompt, image=image, mask=mask, **options)

    def hires(self, prompt: Prompt, negative_prompt: Prompt | None = None, *, scale: float = 2.0, strength: float = 0.5,
              width: int | None = None, height: int | None = None, progress: bool = True, output: Output = "pil",
              **options) -> list[Image.Image] | torch.Tensor:
        """"Hires fix": compose at a size the model knows, then add detail at ``scale`` × that size.

        1. generate at width × height (default: the model's training size),
        2. upscale the images bicubically to the target size (width, height × scale, rounded to multiples of
           the VAE's factor) — in pixels, not latents,
        3. image-to-image at the target size with ``strength`` (the same prompts, seeds and settings).
        Upscaling latents would save a VAE decode and encode, but interpolated latents are no image's latents (they
        decode blurred and blotchy), so only a strength high enough to redraw much of the composition repairs them;
        an image upscaled and encoded is a real, if soft, image, so a moderate strength only adds detail.
        Sampling straight at the large size repeats subjects instead: the model was trained at its own size.
        """
        width, height = width or self.config.size, height or self.config.size
        f = self.vae.config.downsample_factor
        target = [f * max(1, round(side * scale / f)) for side in (height, width)]
        small = self(prompt, negative_prompt, width=width, height=height, progress=progress, output="tensor", **options)
        large = F.interpolate(small, size=target, mode="bicubic").clamp(-1, 1)
        return self(prompt, negative_prompt, image=large, strength=strength, progress=progress, output=output,
                    **options)

    def repaint(self, records: Iterator[StepRecord], z0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                sigmas: torch.Tensor) -> Iterator[StepRecord]:
        """Inpainting with an ordinary UNet: after each step s of the run, the known region (mask 0) is replaced by
        the image's latents z_0 noised to the level the next step starts from, with the ε that x_T was made of,

            x_s ← m · x_s + (1 − m) · (√ᾱ_s z_0 + √(1 − ᾱ_s) ε)      (x ← m · x + (1 − m) · z_0 after the last step)

        as diffusers' StableDiffusionInpaintPipeline does for a 4-channel UNet (the "replacement" method of
        [Song et al. 2021, App. I.2]; RePaint [Lugmayr et al. 2022] without its resampling). m is the mask at
        latent size (``masks``), s the next step of the run, ᾱ_s = 1/(1 + σ_s²) from ``sigmas``, the run's noise levels
        (``levels``: at its timesteps, fractional ones too, or its σ schedule's). The sampler continues from the x_prev
        it yielded, so the blend is written into it."""
        last = len(sigmas) - 1
        for record in records:
            known = self.noised_to(z0, sigmas[record.index + 1], noise) if record.index < last else z0
            record.x_prev.copy_(mask * record.x_prev + (1 - mask) * known)
            yield record

    def masks(self, mask: ImageInput, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask binarised (1 = repaint, where it is ≥ ½ in [0, 1]) at image size and, nearest-neighbour, at the
        latents' size (B, 1, h, w), as diffusers' StableDiffusionInpaintPipeline prepares it."""
        n, _, h, w = shape
        f = self.vae.config.downsample_factor
        m = (self.image_tensor(mask, w * f, h * f, channels=1, what="mask") + 1) / 2
        if m.shape[0] not in (1, n):
            raise ValueError(f"got {m.shape[0]} masks for {n} outputs")
        m = (m >= 0.5).float()
        return m, F.interpolate(m, size=(h, w))

    def inpainting_channels(self, image: ImageInput, mask: ImageInput, shape, g: Generators) -> torch.Tensor:
        """The inpainting UNet's extra input: the mask at latent size and the latents of the image with the
        masked part blanked out, (B, 1 + 4, h, w), as diffusers' StableDiffusionInpaintPipeline prepares them."""
        n, _, h, w = shape
        f = self.vae.config.downsample_factor
        pixels = self.image_tensor(image, w * f, h * f)
        if pixels.shape[0] not in (1, n):
            raise ValueError(f"got {pixels.shape[0]} images for {n} outputs")
        m, m_latent = self.masks(mask, shape)
        masked_latents = self.encode(pixels * (m < 0.5), g).expand(n, -1, -1, -1)
        return torch.cat([m_latent.expand(n, -1, -1, -1), masked_latents], dim=1)


def check_refiner(refiner, what: str = "the refiner") -> None:
    """Refuse a second stage that is no SDXL refiner: it must read the base's latents (SDXL's VAE) and be
    conditioned as a refiner, which only the refiner's aesthetic-score size ids say."""
    if not refiner.config.requires_aesthetics_score:
        raise ValueError(f"{what} is a {refiner.config.family} model, not an SDXL refiner "
                         "(stable-diffusion-xl-refiner-1.0 or a fine-tune of it)")
