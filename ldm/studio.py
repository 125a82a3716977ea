"""``ldm studio``: steer the reverse process of any model ``ldm.load_pipeline`` reads, in a local web page.

``Studio`` is the page's logic without the page: a request (prompt or class, negative prompt, seed, sampler, steps,
guidance, size) runs as the reverse process, yielding a preview of x̂₀ every step (``ldm.preview``) and, at the end,
the image, its trajectory (x_t and x̂₀ at every step) and a PNG that records its settings as ``ldm txt2img`` or
``ldm sample`` would (``ldm.provenance``), so ``--from-png`` makes it again. ``app`` lays it out with Gradio, the
framework the common Stable Diffusion UIs and model demos use (the ``[studio]`` extra; ldm itself never needs it):
one request at a time per model, in a queue that shows each waiting request its position; a running request can be
cancelled, and a bad one is an error message on the page, never the end of the server.
"""

from __future__ import annotations

import random
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
from PIL import Image

from .images import grid_image, to_pil, to_uint8
from .pipeline import DiffusionPipeline
from .provenance import read_settings, save_png
from .samplers import ALIASES, SAMPLERS, resolve_sampler
from .stable_diffusion import StableDiffusion

TOY_SCALE = 4  # toy images (28², 32²) are enlarged this much on the page and in their PNG


@dataclass(frozen=True)
class Request:
    """One image: what the page's form says."""

    prompt: str = ""
    negative_prompt: str = ""
    class_label: int | None = None  # a class-conditional toy run's class (None: unconditional)
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 1.0
    width: int | None = None  # Stable Diffusion only (None: the model's size)
    height: int | None = None


@dataclass
class Frame:
    """What the page shows after a step: the step, and x̂₀'s preview; the last frame also has the result."""

    step: int
    total: int
    preview: Image.Image
    image: Image.Image | None = None
    png: Path | None = None
    trajectory: list[Image.Image] | None = None  # per step: x_t beside x̂₀


class Studio:
    """One model and what the page does with it: run a request, step by step; read a PNG's settings back."""

    def __init__(self, pipe: StableDiffusion | DiffusionPipeline, model: str | Path, out_dir: str | Path | None = None):
        self.pipe, self.model = pipe, Path(model)
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="ldm-studio-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.is_sd = isinstance(pipe, StableDiffusion)
        self.num_classes = None if self.is_sd else pipe.unet.config.num_classes
        self.previewer = pipe.previewer("auto")

    @property
    def samplers(self) -> list[str]:
        return [s for s in (*SAMPLERS, *ALIASES) if self.is_sd or resolve_sampler(s)[0] != "lcm"]

    def defaults(self) -> Request:
        if self.is_sd:
            return Request(sampler=self.pipe.default_sampler, steps=self.pipe.default_steps,
                           guidance=self.pipe.guidance(None), width=self.pipe.config.size, height=self.pipe.config.size)
        return Request(sampler=self.pipe.default_sampler, steps=self.pipe.default_steps,
                       guidance=3.0 if self.num_classes else 1.0,
                       class_label=0 if self.num_classes else None)

    def check(self, request: Request) -> Request:
        """The request as it will run, or a ValueError naming what is wrong with it."""
        resolve_sampler(request.sampler)
        if request.steps < 1 or request.steps > 1000:
            raise ValueError(f"steps must be 1 … 1000, got {request.steps}")
        if not 0 <= request.seed < 2**63:
            raise ValueError(f"seed must be 0 … 2^63 − 1, got {request.seed}")
        if request.guidance < 0:
            raise ValueError(f"guidance must be ≥ 0, got {request.guidance}")
        if self.is_sd:
            if not request.prompt.strip():
                raise ValueError("write a prompt")
            f = self.pipe.vae.config.downsample_factor
            for name in ("width", "height"):
                if getattr(request, name) is not None and getattr(request, name) % f:
                    raise ValueError(f"{name} {getattr(request, name)} is not divisible by {f}")
        elif request.class_label is not None and self.num_classes is None:
            return replace(request, class_label=None)
        return request

    def run(self, request: Request) -> Iterator[Frame]:
        """The reverse process for ``request``: a ``Frame`` per step, the last with the image and its PNG."""
        request = self.check(request)
        if self.is_sd:
            records = self.pipe.loop(request.prompt, request.negative_prompt or None, width=request.width,
                                     height=request.height, num_inference_steps=request.steps,
                                     guidance_scale=request.guidance, sampler=request.sampler, seed=request.seed)
        else:
            label = None if request.class_label is None else torch.tensor([request.class_label])
            options = {"eta": 0.0} if resolve_sampler(request.sampler)[0] == "ddim" else {}
            records = self.pipe.loop(1, sampler=request.sampler, num_inference_steps=request.steps, seed=request.seed,
                                     class_label=label, guidance_scale=request.guidance, **options)
        trajectory, record = [], None
        with torch.inference_mode():
            for record in records:
                preview = self._picture(record.preview)
                trajectory.append(_side_by_side(self._picture(self.previewer(record.x_t)), preview))
                yield Frame(record.index + 1, request.steps, preview)
            image = self._final(record.x_prev)
        png = self.out_dir / f"ldm-{request.seed}-{len(list(self.out_dir.glob('ldm-*.png')))}.png"
        save_png(image, png, self.settings(request))
        yield Frame(len(trajectory), len(trajectory), image, image=image, png=png, trajectory=trajectory)

    def _picture(self, x: torch.Tensor) -> Image.Image:
        image = to_pil(to_uint8(x[0]))
        return image if self.is_sd else image.resize((image.width * TOY_SCALE, image.height * TOY_SCALE),
                                                     Image.NEAREST)

    def _final(self, x: torch.Tensor) -> Image.Image:
        if self.is_sd:
            return self.pipe.images(self.pipe.decode(x), "pil")[0]
        return grid_image(self.pipe.decode(x), nrow=1, scale=TOY_SCALE)  # as `ldm sample --n 1 --scale 4` writes

    def settings(self, request: Request) -> dict:
        """The PNG's settings, in the vocabulary of the command that makes the same image."""
        from .cli.provenance import recorded  # the commands' own record, so their --from-png reads it

        if self.is_sd:
            return recorded("txt2img", self.model, prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                            steps=request.steps, sampler=request.sampler, guidance_scale=request.guidance,
                            seed=request.seed, width=request.width, height=request.height, n=1)
        return recorded("sample", self.model, sampler=request.sampler, steps=request.steps, seed=request.seed, n=1,
                        class_label=request.class_label, guidance_scale=request.guidance, nrow=1, scale=TOY_SCALE)

    def from_png(self, path: str | Path) -> Request:
        """The request a PNG's settings describe (ldm's or a UI's), on this model."""
        found = read_settings(path)
        current, fields = self.defaults(), {}
        for name, key in (("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("seed", "seed"),
                          ("sampler", "sampler"), ("steps", "steps"), ("guidance", "guidance_scale"),
                          ("width", "width"), ("height", "height"), ("class_label", "class_label")):
            if found.get(key) is not None:
                fields[name] = found[key]
        if found.get("sigmas"):  # the UI name that carries the schedule ("DPM++ 2M Karras")
            fields["sampler"] = next((a for a, target in ALIASES.items()
                                      if target == (resolve_sampler(fields["sampler"])[0], found["sigmas"])),
                                     fields["sampler"])
        return self.check(replace(current, **fields))


def _side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    both = Image.new("RGB", (left.width + right.width + 4, max(left.height, right.height)), "white")
    both.paste(left.convert("RGB"), (0, 0))
    both.paste(right.convert("RGB"), (left.width + 4, 0))
    return both


def check_port(host: str, port: int) -> None:
    """A clear error now, rather than a framework's traceback later, when ``port`` is taken."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise ValueError(f"port {port} on {host} is in use: pick another with --port") from None


def app(studio: Studio):
    """The page (a Gradio ``Blocks``): the form, a live preview, the image, its trajectory and its PNG."""
    import gradio as gr

    with gr.Blocks(title=f"ldm studio — {studio.model.name}") as page:
        gr.Markdown(f"## ldm studio — `{studio.model.name}`\nEvery step shows x̂₀, the model's current guess of the "
                    "finished image; the PNG records how it was made (`ldm info`, `--from-png`).")
        ui = _layout(gr, studio)
        frames = gr.State([])
        form = [ui.prompt, ui.negative, ui.label, ui.seed, ui.random_seed, ui.sampler, ui.steps, ui.guidance,
                ui.width, ui.height]
        run = ui.go.click(_generate(gr, studio), form, [ui.preview, ui.status, ui.download, ui.scrub, ui.strip, frames,
                                                        ui.seed], concurrency_limit=1, concurrency_id="model")
        ui.stop.click(None, cancels=[run])
        ui.scrub.change(lambda step, shown: shown[int(step) - 1] if shown else gr.skip(), [ui.scrub, frames], ui.strip)
        ui.reproduce.upload(_read_png(gr, studio), ui.reproduce, [*form, ui.status])
    return page


def _layout(gr, studio: Studio) -> SimpleNamespace:
    """The page's components: the form on the left, what it makes on the right."""
    d, ui = studio.defaults(), SimpleNamespace()
    with gr.Row():
        with gr.Column():
            ui.prompt = gr.Textbox(label="prompt", visible=studio.is_sd, elem_id="prompt")
            ui.negative = gr.Textbox(label="negative prompt", visible=studio.is_sd, elem_id="negative")
            classes = [("none (unconditional)", -1)] + [(str(k), k) for k in range(studio.num_classes or 0)]
            ui.label = gr.Dropdown(classes, value=-1 if d.class_label is None else d.class_label, label="class",
                                   visible=bool(studio.num_classes), elem_id="class")
            with gr.Row():
                ui.seed = gr.Number(value=d.seed, precision=0, label="seed", elem_id="seed")
                ui.random_seed = gr.Checkbox(label="random seed", elem_id="random-seed")
            ui.sampler = gr.Dropdown(studio.samplers, value=d.sampler, label="sampler", elem_id="sampler")
            ui.steps = gr.Slider(1, 1000, value=d.steps, step=1, label="steps", elem_id="steps")
            ui.guidance = gr.Slider(0, 20, value=d.guidance, step=0.5, label="guidance", elem_id="guidance")
            ui.width = gr.Slider(256, 1536, value=d.width or 512, step=64, label="width", visible=studio.is_sd)
            ui.height = gr.Slider(256, 1536, value=d.height or 512, step=64, label="height", visible=studio.is_sd)
            with gr.Row():
                ui.go = gr.Button("generate", variant="primary", elem_id="generate")
                ui.stop = gr.Button("cancel", elem_id="cancel")
            ui.reproduce = gr.File(label="reproduce: drop a PNG to read its settings into the form",
                                   file_types=[".png"], type="filepath", elem_id="reproduce")
        with gr.Column():
            ui.status = gr.Markdown(elem_id="status")
            ui.preview = gr.Image(label="image", type="pil", format="png", interactive=False, elem_id="preview")
            ui.download = gr.DownloadButton("download PNG (with its settings)", visible=False, elem_id="download")
            ui.scrub = gr.Slider(1, 2, value=1, step=1, label="trajectory step: x_t (left) and x̂₀ (right)",
                                 visible=False, elem_id="scrub")
            ui.strip = gr.Image(label="trajectory", type="pil", format="png", interactive=False, visible=False,
                                elem_id="strip")
    return ui


def _generate(gr, studio: Studio):
    """The generate button's handler: a preview per step, then the image, its PNG and its trajectory."""

    def generate(prompt, negative, label, seed, random_seed, sampler, steps, guidance, width, height):
        seed = random.randrange(2**31) if random_seed else int(seed or 0)
        request = Request(prompt or "", negative or "", None if label in (None, -1) else int(label), seed, sampler,
                          int(steps), float(guidance), int(width) if studio.is_sd else None,
                          int(height) if studio.is_sd else None)
        try:
            for frame in studio.run(request):
                if frame.image is None:
                    yield (frame.preview, f"step {frame.step} / {frame.total} (seed {seed})", gr.skip(), gr.skip(),
                           gr.skip(), gr.skip(), seed)
                    continue
                n = len(frame.trajectory)
                yield (frame.image, f"done: {n} steps, seed {seed}", gr.update(value=str(frame.png), visible=True),
                       gr.update(maximum=n, value=n, visible=n > 1), gr.update(value=frame.trajectory[-1], visible=True),
                       frame.trajectory, seed)
        except (ValueError, RuntimeError) as e:  # a bad request is a message on the page; the server goes on
            raise gr.Error(str(e)) from None

    return generate


def _read_png(gr, studio: Studio):
    """The drop zone's handler: a PNG's settings into the form."""

    def read_png(path):
        if path is None:
            return [gr.skip()] * 11
        try:
            r = studio.from_png(path)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return (r.prompt, r.negative_prompt, -1 if r.class_label is None else r.class_label, r.seed, False, r.sampler,
                r.steps, r.guidance, r.width or gr.skip(), r.height or gr.skip(),
                f"read the settings of {Path(path).name}")

    return read_png


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          block: bool = True):
    """Load ``model``, check the port, and serve its studio (``block=False``: return the running page)."""
    from .loading import load_pipeline
    from .sampling import default_device

    check_port(host, port)
    pipe = load_pipeline(model, device=device or default_device())
    page = app(Studio(pipe, model))
    page.queue(default_concurrency_limit=1)
    print(f"ldm studio: {model} at http://{host}:{port}/ (Ctrl-C stops it)")
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=True)
    return page


__all__ = ["Frame", "Request", "Studio", "app", "check_port", "serve"]
