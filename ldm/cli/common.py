"""What every ``ldm`` command shares: the model argument, loading, adapters, the sampling options, and the
denoising loop with its trajectory files."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..config import parse_bool
from ..images import save_gif, save_strip
from ..loading import load_pipeline
from ..pipeline import DiffusionPipeline
from ..preview import PreviewFiles
from ..samplers import ALIASES, SAMPLER_NAMES, SAMPLERS, SIGMA_SAMPLERS, SIGMA_SCHEDULES, run_to_end
from ..sampling import default_device


def model_path(args: argparse.Namespace) -> str:
    """The model, given as the positional MODEL or as --checkpoint MODEL (one of them)."""
    if (args.model is None) == (args.checkpoint is None):
        raise ValueError(f"give the model once: `ldm {args.command} MODEL` or `ldm {args.command} --checkpoint MODEL`")
    return args.model or args.checkpoint


def load(args: argparse.Namespace, path: str | None = None, **options):
    """The command's model (or the one at ``path``) through ``ldm.load_pipeline``, with its notes printed."""
    options.setdefault("device", getattr(args, "device", None) or default_device())
    pipe = load_pipeline(path or model_path(args), ema=not getattr(args, "raw_weights", False), **options)
    for note in getattr(pipe, "notes", []):
        print(f"{pipe.config.family}: {note}")
    if getattr(args, "compile", False):
        pipe.compile()
    return pipe


def lora_option(text: str) -> tuple[str, float]:
    """An argparse type: FILE or FILE:SCALE (e.g. style.safetensors:0.8); the scale defaults to 1."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:  # a colon that belongs to the path
        return text, 1.0


def add_adapters(pipe, args: argparse.Namespace) -> None:
    """Attach the command's --lora files (each at its scale) and --embedding files, saying what was loaded."""
    for path, scale in getattr(args, "lora", None) or ():
        name = pipe.load_lora(path, scale=scale)
        layers = sum(len(lora.targets) for lora in pipe.loras[name].values())
        print(f"LoRA {name}: {layers} layers at scale {scale:g}")
    if pipe.loras:  # a command's scales never change, so fold them in: every step then costs what the base's does
        pipe.fuse_lora()
    for path in getattr(args, "embedding", None) or ():
        tokens = pipe.load_embedding(path)
        if isinstance(pipe, DiffusionPipeline):  # a toy run's textual inversion: new class labels
            print(f"embedding {Path(path).name}: new class {', '.join(map(str, tokens))} (--class {tokens[0]})")
        else:
            print(f"embedding {Path(path).name}: use {tokens[0]!r} in the prompt ({len(tokens)} vectors)")


def denoise(pipe, records, total: int, trajectory: Path | None, previews: PreviewFiles | None = None,
            keep: int = 10) -> torch.Tensor:
    """Run ``loop``'s records to the end (progress bar) and decode the result, (B, C, H, W) in [−1, 1], keeping
    ``previews`` up to date on the way.

    With ``trajectory`` (OUT_trajectory) also write how the samples emerge, at ≤ ``keep`` evenly spaced steps:
    a PNG strip of the first sample (top x_t, bottom x̂_0) and a GIF of the first ≤ 8 samples (x_t | x̂_0)."""
    kept = set(np.linspace(0, total - 1, min(keep, total)).round().astype(int).tolist())
    frames = []

    def collect(record) -> None:
        if trajectory is not None and record.index in kept:
            frames.append((record.t, pipe.decode(record.x_t[:8]).cpu(), pipe.decode(record.x0_pred[:8]).cpu()))

    last = run_to_end(records if previews is None else previews.watch(records), total, True, "denoise", collect)
    if trajectory is not None:
        scale = 3 if frames[0][1].shape[-1] <= 64 else 1  # enlarge small digits, not 512² images
        strip = save_strip([torch.stack([x[0] for _, x, _ in frames]), torch.stack([x0[0] for _, _, x0 in frames])],
                           trajectory.with_name(trajectory.name + ".png"), scale=scale)
        gif = save_gif([torch.cat([x, x0], dim=-1) for _, x, x0 in frames], trajectory.with_name(trajectory.name + ".gif"),
                       scale=scale)
        print(f"trajectory: {strip} (top: x_t, bottom: predicted x0, at t = {[t for t, _, _ in frames]}), {gif}")
    return pipe.decode(last.x_prev)


def trajectory_path(args: argparse.Namespace) -> Path | None:
    out = Path(args.out)
    return out.with_name(out.stem + "_trajectory") if args.trajectory else None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_model(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", help=what)
    p.add_argument("--checkpoint", help="the model, as an option instead of MODEL")


def boolean(text: str) -> bool:
    """An argparse type: true/false (1/0, yes/no, on/off)."""
    try:
        return parse_bool(text, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def number(kind: type, minimum: float, inclusive: bool = True):
    """An argparse type: a ``kind`` number ≥ ``minimum`` (> with ``inclusive=False``), or an error that says so."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'≥' if inclusive else '>'} {minimum}, got {text}")
        return value
    return parse


MODEL_SAMPLERS = "the model’s: dpm++2m_sde for ldm’s toy runs, dpm++2m for SD, euler for SD-Turbo, lcm for an LCM"


def add_sampling(p: argparse.ArgumentParser, sampler: str | None, steps: int | None, guidance: float | None,
                 n: int) -> None:
    """The options every sampling command shares, with that command's defaults (None: the model's own, e.g. 1 step,
    Euler and no guidance for SD-Turbo, DPM++ 2M SDE and 25 steps for ldm's toy runs, else DPM++ 2M, 25 steps, 7.5)."""
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=sampler, metavar="SAMPLER",
                   help=f"one of {', '.join(SAMPLERS)}, or as UIs name them: {', '.join(map(repr, ALIASES))} "
                        f"(default {sampler or MODEL_SAMPLERS})")
    p.add_argument("--sigmas", choices=SIGMA_SCHEDULES, help="σ schedule for the σ-space samplers "
                   f"({', '.join(SIGMA_SAMPLERS)}): Karras et al.'s ρ = 7, log-uniform or Beta(0.6, 0.6) spacing")
    p.add_argument("--steps", type=number(int, 1), default=steps,
                   help=f"number of inference steps (default {steps or 'the model’s: 25, 1 for Turbo, 4 for LCM'})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", "--guidance-scale", dest="guidance_scale", type=number(float, 0), default=guidance,
                   help="classifier-free guidance scale ≥ 0 (1 = off, 0 = unconditional)" if guidance is not None else
                   "classifier-free guidance scale (default the model’s: 7.5, off for Turbo, 8.5 for LCM; ≤ 1 = off)")
    p.add_argument("--n", type=number(int, 1), default=n, help="number of images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="run the UNet under torch.compile: each step faster (14 %% "
                   "for SD at 512² on a Zen 4 CPU) after minutes of compiling, so worth it for many images only")


def add_preview_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preview", metavar="KIND", help="keep OUT.preview.png showing the image as it forms (predicted "
                   "x0), and write OUT.preview.gif: linear (latent → RGB factors; fitted to a toy VAE), tiny:PATH "
                   "(TAESD, Stable Diffusion), full (the VAE), auto (linear where it can)")
    p.add_argument("--preview-every", type=number(int, 1), default=1, metavar="N", help="a preview every N steps")


def preview_files(args: argparse.Namespace, pipe, total: int) -> PreviewFiles | None:
    """The command's --preview files, OUT.preview.png and OUT.preview.gif, or None."""
    if args.preview in (None, "none"):
        return None
    pipe.previewer(args.preview)  # a bad kind fails here, before the progress bar (the loop makes it lazily)
    out = Path(args.out)
    return PreviewFiles(out.with_name(out.stem + ".preview.png"), out.with_name(out.stem + ".preview.gif"), total,
                        args.preview_every)


def seed_list(text: str) -> list[int]:
    """An argparse type: comma-separated integer seeds, e.g. 3,17,42."""
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_adapter_options(p: argparse.ArgumentParser, embeddings: bool = True) -> None:
    p.add_argument("--lora", action="append", type=lora_option, metavar="FILE[:SCALE]",
                   help="a LoRA file (kohya / A1111 or diffusers layout) at SCALE (default 1); repeat for several")
    if embeddings:
        p.add_argument("--embedding", action="append", metavar="FILE", help="a textual-inversion embedding (A1111 "
                       ".pt/.safetensors, diffusers learned_embeds): its file name becomes a word of the prompt; for "
                       "a class-conditional run, a toy textual inversion's new class (label printed)")


def add_seeds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=seed_list, help="one seed per image, e.g. 3,17,42 (their number is the number of "
                   "images); by default image k gets --seed + k, so it is the image that seed gives alone")
