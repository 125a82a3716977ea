"""Live previews: the sampler's current guess of the finished image, cheaply, at every step.

Why x̂₀ and not x_t: until the last steps x_t is mostly noise (at SD's step 5 of 25 it is √ᾱ ≈ 0.4 image and
0.9 noise), so showing it shows static. Every step already computes the model's estimate of the clean sample,

    x̂₀ = (x_t − √(1 − ᾱ_t) · ε̂) / √ᾱ_t                          [Ho et al. 2020, Eq. 15]

(``StepRecord.x0_pred``), which is blurry early — the average of every image the noise is consistent with — and
sharpens as the sampler commits. Previewing it is looking at that estimate; no extra model call is needed, only a
way from model space to pixels, three of them here, from cheapest to exact:

    linear  a per-pixel affine map of the latent channels to RGB (``LatentRGB``; published factors for SD 1/2 and
            SDXL, or ``fit_latent_rgb`` for any VAE): ~free, one pixel per latent pixel
    tiny    TAESD (``ldm.taesd.AutoencoderTiny``), a 1 M-parameter decoder distilled from SD's: sharp, a few % of a step
    full    the pipeline's own VAE decode: exact, but at 512² it costs about what a UNet step does

Pixel-space models need none of this: their x̂₀ is the image. ``Previewer`` picks one of these for a pipeline; the
pipelines hang it on every ``StepRecord`` they yield, which computes ``record.preview`` only when it is read.
``live`` shows previews in a notebook as they come; ``PreviewFiles`` keeps ``OUT.preview.png`` up to date for any
image viewer and writes the sequence as a GIF.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write
from .images import make_grid, save_gif, to_pil
from .taesd import latent_space

# 4 latent channels → R, G, B (rows: channels), and a bias, for latents in model space (scaled by the VAE's factor),
# giving images in [−1, 1]. These are the factors the common UIs ship (ComfyUI's comfy/latent_formats.py, SD15 and
# SDXL), fitted by least squares on decoded images; SD 2 shares SD 1's VAE.
LATENT_RGB_FACTORS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "sd": (((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
           (0.0, 0.0, 0.0)),
    "sdxl": (((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
             (0.1084, -0.0175, -0.0011)),
}
PREVIEWS = ("auto", "linear", "tiny:PATH", "full", "none")


@dataclass(frozen=True)
class LatentRGB:
    """A linear preview: each latent pixel's C channels mapped to an image pixel by one affine map,

        rgb = z · W + b,   W (C, 3 or 1), b (3 or 1)

    where z is the latent in model space (s · the VAE's z). Shapes: (B, C, h, w) → (B, 3, h, w), in [−1, 1]
    (clamped), one image pixel per latent pixel (an 8× smaller picture for SD; ``Previewer`` enlarges it).
    A decoder is far from linear, but the latents' colour is: SD's first channel reads as brightness, the
    others as colour-opponent axes, so a 4×3 matrix gets the layout and colours of x̂₀ right."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def for_family(cls, family: str) -> "LatentRGB":
        """The published factors for a Stable Diffusion family ("sd1", "sd2", "sdxl", …)."""
        weight, bias = LATENT_RGB_FACTORS[latent_space(family)]
        return cls(torch.tensor(weight), torch.tensor(bias))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.weight.shape[0]:
            raise ValueError(f"a linear preview for {self.weight.shape[0]} latent channels got latents of shape "
                             f"{tuple(latents.shape)}")
        weight, bias = self.weight.to(latents), self.bias.to(latents)
        return (torch.einsum("bchw,cr->brhw", latents, weight) + bias[:, None, None]).clamp(-1, 1)


def preview_copy(taesd: torch.nn.Module) -> torch.nn.Module:
    """The TAESD to preview with: on a CPU with native bf16 (AVX512-BF16, AMX) a bf16 copy, which decodes a 512²
    preview about 3× faster than fp32 (0.27 s against 0.79 on a 2-core Sapphire Rapids) — a preview needs no fp32
    precision, and the caller's TAESD, which may be the final decoder, keeps its own dtype; elsewhere (AVX2 CPUs
    emulate bf16, slowly; GPUs) the TAESD itself."""
    weight = next(taesd.parameters())
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return copy.deepcopy(taesd).eval().to(torch.bfloat16)
    return taesd.eval()


@torch.no_grad()
def fit_latent_rgb(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> LatentRGB:
    """The linear preview that best reproduces ``images`` from their latents, by least squares:

        W, b = argmin Σ_pixels ‖ z · W + b − avgpool_f(x) ‖²

    over every latent pixel of every image, where z = ``encode``(x) (model space: the VAE's mean times its scale,
    e.g. ``pipe.encode``) and avgpool_f(x) the image averaged over the f × f pixels each latent pixel covers. The
    closed form is the normal equations' solution, computed stably by ``torch.linalg.lstsq`` in float64. This is how
    the published SD factors were made; fitted to a toy VAE it gives that VAE's factors (``LATENT_RGB_FACTORS``).
    Shapes: images (N, C_img, H, W) in [−1, 1], latents (N, C, H/f, W/f) → W (C, C_img), b (C_img,).
    """
    latents = encode(images).double()
    if latents.dim() != 4 or images.shape[-1] % latents.shape[-1] or images.shape[-2] % latents.shape[-2]:
        raise ValueError(f"images {tuple(images.shape)} and latents {tuple(latents.shape)}: each latent pixel must "
                         "cover a whole block of image pixels")
    target = F.adaptive_avg_pool2d(images.double().to(latents.device), latents.shape[-2:])
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (pixels, C)
    rgb = target.permute(0, 2, 3, 1).reshape(-1, images.shape[1])  # (pixels, C_img)
    if z.shape[0] <= z.shape[1] + 1:
        raise ValueError(f"{z.shape[0]} latent pixels cannot determine {z.shape[1] + 1} coefficients per colour")
    solution = torch.linalg.lstsq(torch.cat([z, torch.ones_like(z[:, :1])], dim=1), rgb).solution
    return LatentRGB(solution[:-1].float().cpu(), solution[-1].float().cpu())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [−1, 1] (peak-to-peak 2): 10 log₁₀(2² / MSE), in dB."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


class Previewer:
    """Model space → a preview image in [−1, 1] at the output size, one of ``PREVIEWS``:

    - ``"linear"``: ``LatentRGB`` (the family's published factors for Stable Diffusion; fitted once, on first use,
      with ``fit_latent_rgb`` on ``fit_images`` for a toy latent model), enlarged bilinearly to the image size;
    - ``"tiny:PATH"`` (or an ``AutoencoderTiny``): TAESD's decoder, for the latent space it was made for;
    - ``"full"``: the pipeline's own VAE (``full``, else ``decode``);
    - ``"auto"``: linear where factors exist or can be fitted, else full; a pixel-space model's x̂₀ is its own
      preview (``decode`` is the identity there), whatever is asked;
    - any other callable: used as it is, x̂₀ → image.
    """

    def __init__(self, kind, decode: Callable[[torch.Tensor], torch.Tensor], factor: int, *,
                 family: str | None = None, fit_images: Callable[[], torch.Tensor] | None = None,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 full: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.kind, self.factor = kind, factor
        self._decode, self._family, self._fit_images, self._encode = full or decode, family, fit_images, encode
        self._linear: LatentRGB | None = None
        self._tiny = None
        if callable(kind) and not hasattr(kind, "decode"):  # the caller's own x̂₀ → image function
            self.kind, self._decode = "custom", kind
        elif factor == 1:  # pixel space: x̂₀ is the picture
            self.kind = "pixels"
        elif not isinstance(kind, str) or kind.startswith("tiny:"):
            self._tiny, self.kind = self._check_tiny(kind), "tiny"
        elif kind == "auto":
            self.kind = "linear" if family is not None or fit_images is not None else "full"
        elif kind == "linear" and family is None and fit_images is None:
            raise ValueError("a linear preview needs a Stable Diffusion family's factors or images to fit them on")
        elif kind not in ("linear", "full"):
            raise ValueError(f"unknown preview {kind!r}; known: {', '.join(PREVIEWS)}")

    def _check_tiny(self, taesd):
        """A TAESD (or "tiny:PATH", loaded) made for this pipeline's latent space."""
        if self._family is None:
            raise ValueError("a tiny decoder (TAESD) previews Stable Diffusion latents; this model has other latents: "
                             "use --preview linear or full")
        from .convert.taesd import check_latent_space, load_taesd

        taesd = load_taesd(taesd[len("tiny:"):]) if isinstance(taesd, str) else taesd
        check_latent_space(taesd, self._family)
        return preview_copy(taesd)

    @property
    def linear(self) -> LatentRGB:
        if self._linear is None:
            self._linear = LatentRGB.for_family(self._family) if self._family is not None else \
                fit_latent_rgb(self._encode, self._fit_images())
        return self._linear

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.kind == "pixels":
            return x0.float().clamp(-1, 1)
        if self.kind == "custom":
            return self._decode(x0)
        if self.kind == "linear":
            small = self.linear(x0.float())
            size = (x0.shape[-2] * self.factor, x0.shape[-1] * self.factor)
            return F.interpolate(small, size=size, mode="bilinear", align_corners=False).clamp(-1, 1)
        if self.kind == "tiny":
            taesd = self._tiny
            return taesd.decode(x0.to(next(taesd.parameters()))).float().clamp(-1, 1)
        return self._decode(x0).float().clamp(-1, 1)


def with_previews(records: Iterable, previewer: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator:
    """Hang ``previewer`` on each record (``StepRecord.preview`` computes it when read)."""
    for record in records:
        record.previewer = previewer
        yield record


def previews_due(total: int, every: int) -> set[int]:
    """The steps (0-based) a preview is made at, every ``every`` steps and always the last one."""
    if every < 1:
        raise ValueError(f"--preview-every must be at least 1 (a preview every N steps), got {every}")
    return set(range(every - 1, total, every)) | {total - 1}


class PreviewFiles:
    """Keep ``path`` (a PNG) showing the latest preview while sampling, and write the sequence to ``gif``.

    Each PNG is written to a temporary file and renamed over the old one (``checkpoint.atomic_write``), so an
    image viewer that reloads it never reads half a file. Use as a wrapper of a pipeline's records:
    ``for record in PreviewFiles(out, gif, total, every).watch(records): ...``."""

    def __init__(self, path: str | Path, gif: str | Path | None, total: int, every: int = 1, keep: int = 8):
        self.path, self.gif, self.keep = Path(path), None if gif is None else Path(gif), keep
        self.due = previews_due(total, every)
        self.frames: list[torch.Tensor] = []

    def write(self, preview: torch.Tensor) -> None:
        """One preview (B, C, H, W) in [−1, 1]: the first ``keep`` images as a grid, atomically over ``path``."""
        grid = to_pil(make_grid(preview[: self.keep]))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        atomic_write(self.path, lambda f: f.write(buffer.getvalue()))
        self.frames.append(preview[: self.keep].cpu())

    def watch(self, records: Iterable) -> Iterator:
        for record in records:
            if record.index in self.due:
                self.write(record.preview)
            yield record
        if self.gif is not None and self.frames:
            save_gif(self.frames, self.gif)


def live(records: Iterable, every: int = 1, keep: int = 8, scale: int = 1) -> Iterator:
    """Show each record's preview in a Jupyter notebook as sampling runs, updating one displayed image in place
    (an IPython display handle; nothing when IPython is absent), and pass the records on:
    ``last = run_to_end(live(pipe.loop(...)))``. ``scale`` enlarges small images (e.g. 4 for 28² digits)."""
    try:
        from IPython.display import display
    except ImportError:  # not in a notebook: nothing to show
        display = None
    handle = None
    for record in records:
        if display is not None and (record.index + 1) % every == 0:
            image = to_pil(make_grid(record.preview[:keep]))
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale))
            if handle is None:
                handle = display(image, display_id=True)
            else:
                handle.update(image)
        yield record
