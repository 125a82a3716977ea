"""Notebook widgets: step through the forward and reverse processes by hand (ipywidgets, the ``[notebooks]`` extra).

``explore(pipe)`` runs a pipeline — a toy run, a Google DDPM folder, Stable Diffusion — and records every step; a
timestep slider scrubs the recorded trajectory, showing x_t, x̂₀ and the noise the model sees in it,

    ε̂ = (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t)        [Ho et al. 2020, Eq. 4 solved for ε]

side by side with the step's noise level σ_t = √((1 − ᾱ_t)/ᾱ_t) and SNR_t = ᾱ_t/(1 − ᾱ_t) = 1/σ_t². Changing the
seed, sampler, steps, guidance, class or prompt runs it again and updates the same display. ``forward(schedule,
image)`` scrubs q(x_t | x_0) the same way: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε for one fixed ε. Both keep the arrays
they show (``shown``), so a test can drive the controls and read what changed.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from .images import to_pil, to_uint8
from .samplers import ALIASES, SAMPLERS
from .samplers.euler import sigmas_at
from .schedule import NoiseSchedule

SCALE = 4  # small images (28², 32²) are shown this many times larger


def _png(x: torch.Tensor) -> bytes:
    """(C, H, W) in [−1, 1] → PNG bytes, enlarged when small."""
    image = to_pil(to_uint8(x))
    if image.width < 128:
        image = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_level(schedule: NoiseSchedule, t: float) -> tuple[float, float, float]:
    """(ᾱ_t, σ_t, SNR_t) at a timestep (fractional ones too: σ interpolated as the σ-space samplers do)."""
    sigma = sigmas_at(schedule, torch.tensor([float(t)])).item()
    return 1 / (1 + sigma**2), sigma, 1 / max(sigma**2, 1e-20)


class Explorer:
    """The reverse process of ``pipe`` under controls; ``widget`` is what a notebook displays."""

    def __init__(self, pipe, prompt: str = "a lighthouse at dawn", steps: int | None = None):
        import ipywidgets as w

        from .stable_diffusion import StableDiffusion

        self.pipe, self.is_sd = pipe, isinstance(pipe, StableDiffusion)
        self.previewer = pipe.previewer("auto")
        samplers = [s for s in (*SAMPLERS, *ALIASES) if self.is_sd or s not in ("lcm", "LCM")]
        num_classes = None if self.is_sd else pipe.unet.config.num_classes
        style = {"description_width": "80px"}
        self.controls = {
            "seed": w.IntText(value=0, description="seed", style=style),
            "sampler": w.Dropdown(options=samplers, value=pipe.default_sampler, description="sampler", style=style),
            "steps": w.IntSlider(value=steps or (pipe.default_steps if self.is_sd else 25), min=1, max=200,
                                 description="steps", style=style, continuous_update=False),
            "guidance": w.FloatSlider(value=pipe.guidance(None) if self.is_sd else (3.0 if num_classes else 1.0),
                                      min=0, max=15, step=0.5, description="guidance", style=style,
                                      continuous_update=False),
        }
        if self.is_sd:
            self.controls["prompt"] = w.Text(value=prompt, description="prompt", style=style, continuous_update=False)
            self.controls["negative"] = w.Text(value="", description="negative", style=style, continuous_update=False)
        elif num_classes:
            self.controls["label"] = w.Dropdown(options=list(range(num_classes)), value=0, description="class",
                                                style=style)
        self.step = w.IntSlider(value=0, min=0, max=0, description="step", style=style)
        self.images = {name: w.Image(format="png") for name in ("x_t", "x̂₀", "ε̂")}
        self.caption = w.HTML()
        for control in self.controls.values():
            control.observe(lambda _: self.run(), names="value")
        self.step.observe(lambda change: self.show(change["new"]), names="value")
        panels = [w.VBox([w.HTML(f"<b>{name}</b>"), image]) for name, image in self.images.items()]
        self.widget = w.VBox([w.HBox([w.VBox(list(self.controls.values())), w.VBox([self.step, self.caption])]),
                              w.HBox(panels)])
        self.records: list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.shown: dict[str, torch.Tensor] = {}
        self.run()

    def run(self) -> None:
        """Sample with the controls' settings, keep (t, x_t, x̂₀, ε̂) of every step, and show the last step."""
        c = {name: control.value for name, control in self.controls.items()}
        options = dict(sampler=c["sampler"], num_inference_steps=c["steps"], seed=c["seed"],
                       guidance_scale=c["guidance"])
        if self.is_sd:
            records = self.pipe.loop(c["prompt"], c["negative"] or None, **options)
        else:
            label = torch.tensor([c["label"]]) if "label" in c else None
            records = self.pipe.loop(1, class_label=label, **options)
        self.records = []
        with torch.inference_mode():
            for record in records:
                alpha_bar = _noise_level(self.pipe.schedule, record.t)[0]
                eps = (record.x_t - alpha_bar**0.5 * record.x0_pred) / (1 - alpha_bar) ** 0.5
                self.records.append((record.t, record.x_t[:1].clone(), record.x0_pred[:1].clone(), eps[:1]))
        last = len(self.records) - 1
        self.step.max = last
        if self.step.value == last:
            self.show(last)
        self.step.value = last  # shows it (an observer), unless it already was

    def show(self, k: int) -> None:
        """Step k's x_t, x̂₀ and ε̂ (through the model's preview decoder in latent space), and its noise level."""
        t, x_t, x0, eps = self.records[k]
        pictures = {"x_t": self.previewer(x_t), "x̂₀": self.previewer(x0),
                    "ε̂": self.previewer(eps) if self.is_sd else (eps / 3).clamp(-1, 1)}
        for name, x in pictures.items():
            self.shown[name] = x[0]
            self.images[name].value = _png(x[0])
        _, sigma, snr = _noise_level(self.pipe.schedule, t)
        self.caption.value = (f"step {k + 1} of {len(self.records)}: t = {t:g}, σ_t = {sigma:.3g}, "
                              f"SNR_t = {snr:.3g}")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


class ForwardExplorer:
    """q(x_t | x_0) under a timestep slider: x_0, x_t and the fixed ε it was noised with."""

    def __init__(self, schedule: NoiseSchedule, image: torch.Tensor, seed: int = 0):
        import ipywidgets as w

        if image.dim() != 3:
            raise ValueError(f"expected one image (C, H, W) in [−1, 1], got shape {tuple(image.shape)}")
        self.schedule, self.x0 = schedule, image.float()
        self.eps = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(seed))
        T = schedule.num_train_timesteps
        self.t = w.IntSlider(value=T // 2, min=0, max=T - 1, description="t")
        self.images = {name: w.Image(format="png") for name in ("x₀", "x_t", "ε")}
        self.caption = w.HTML()
        self.t.observe(lambda change: self.show(change["new"]), names="value")
        panels = [w.VBox([w.HTML(f"<b>{name}</b>"), image]) for name, image in self.images.items()]
        self.widget = w.VBox([self.t, self.caption, w.HBox(panels)])
        self.shown: dict[str, torch.Tensor] = {}
        self.show(self.t.value)

    def show(self, t: int) -> None:
        alpha_bar, sigma, snr = _noise_level(self.schedule, t)
        x_t = alpha_bar**0.5 * self.x0 + (1 - alpha_bar) ** 0.5 * self.eps  # q(x_t | x_0)  [Ho et al. 2020, Eq. 4]
        for name, x in {"x₀": self.x0, "x_t": x_t, "ε": (self.eps / 3).clamp(-1, 1)}.items():
            self.shown[name] = x
            self.images[name].value = _png(x)
        self.caption.value = f"t = {t}: ᾱ_t = {alpha_bar:.4f}, σ_t = {sigma:.3g}, SNR_t = {snr:.3g}"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def explore(pipe, **options) -> Explorer:
    """Step through ``pipe``'s reverse process (display the result in a notebook)."""
    return Explorer(pipe, **options)


def forward(schedule: NoiseSchedule, image: torch.Tensor, seed: int = 0) -> ForwardExplorer:
    """Scrub q(x_t | x_0) for one image ((C, H, W) in [−1, 1]) and one fixed ε."""
    return ForwardExplorer(schedule, image, seed)
