"""``ldm sample`` and ``ldm evaluate``: toy runs and diffusers DDPM/DDIM folders, sampled and scored."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..images import grid_image
from ..metrics import evaluate_digits, load_samples_npy
from ..provenance import save_png
from ..samplers import resolve_sampler
from ..stable_diffusion import StableDiffusion
from .common import (add_adapter_options, add_adapters, add_model, add_preview_options, add_sampling, add_seeds,
                     denoise, load, model_path, number, preview_files, trajectory_path)
from .provenance import add_provenance_options, apply_from_png, settings


def use_model_defaults(args: argparse.Namespace, pipe) -> None:
    """--sampler and --steps not given: the model's (DPM++ 2M SDE, 25 steps for ldm's own runs; ldm.pipeline)."""
    args.sampler, args.steps = args.sampler or pipe.default_sampler, args.steps or pipe.default_steps


def cmd_sample(args: argparse.Namespace) -> None:
    apply_from_png(args)
    pipe = load(args)
    add_adapters(pipe, args)
    use_model_defaults(args, pipe)
    args.n = len(args.seeds) if args.seeds else args.n
    # the rest (spacing, clipping, DDPM variance) comes from the model
    options = dict(sampler=args.sampler, sigmas=args.sigmas, num_inference_steps=args.steps, seed=args.seed,
                   seeds=args.seeds, guidance_scale=args.guidance_scale)
    if resolve_sampler(args.sampler)[0] == "ddim":
        options["eta"] = args.eta
    if isinstance(pipe, StableDiffusion):  # a text-to-image model (e.g. `ldm train --preset mnist-text`): one grid
        if args.prompt is None or args.class_label is not None:
            raise ValueError(f"{model_path(args)} is a text-to-image model: give --prompt, not --class (`ldm txt2img` "
                             "writes one image per file, with Stable Diffusion's options)")
        first, options = args.prompt, options | dict(negative_prompt=args.negative_prompt, num_images_per_prompt=args.n)
    else:
        if args.prompt is not None or args.negative_prompt is not None:
            raise ValueError(f"--prompt: {model_path(args)} is not a text-to-image model"
                             + (" (it takes --class)" if pipe.unet.config.num_classes else ""))
        class_label, num_classes = args.class_label, pipe.unet.config.num_classes
        if class_label is None and num_classes:  # a class-conditional model: one column per class
            class_label = torch.arange(args.n) % num_classes
            args.nrow = args.nrow or min(num_classes, args.n)  # fewer images than classes: no empty columns
        first, options = args.n, options | dict(class_label=class_label, batch_size=args.batch_size)
    out = Path(args.out)
    if args.trajectory or args.preview:
        options.pop("batch_size", None)
        records = pipe.loop(first, preview=args.preview or "auto", **options)
        with torch.inference_mode():
            samples = denoise(pipe, records, args.steps, trajectory_path(args), preview_files(args, pipe, args.steps))
    else:
        samples = pipe(first, output="tensor", **options)
    recorded = settings(args, sampler=args.sampler, steps=args.steps)
    save_png(grid_image(samples, nrow=args.nrow, scale=args.scale), out, recorded)
    print(f"wrote {out}")
    if args.npy:
        np.save(args.npy, ((samples.float().cpu().clamp(-1, 1) + 1) / 2).numpy())
        print(f"wrote {args.npy} ({args.n}×{samples.shape[1]}×{samples.shape[2]}×{samples.shape[3]} float32 in [0, 1])")


def cmd_evaluate(args: argparse.Namespace) -> None:
    labels = None
    if Path(model_path(args)).suffix == ".npy":
        samples = load_samples_npy(model_path(args))
    else:
        pipe = load(args)
        add_adapters(pipe, args)
        use_model_defaults(args, pipe)
        num_classes = pipe.unet.config.num_classes
        labels = torch.arange(args.n) % num_classes if num_classes else None  # every class equally often
        samples = pipe(args.n, sampler=args.sampler, sigmas=args.sigmas, num_inference_steps=args.steps, seed=args.seed,
                       class_label=labels, guidance_scale=args.guidance_scale, output="tensor").cpu()
    if samples.shape[-2:] != (28, 28):  # e.g. the latent recipe's 32×32 digits: the classifier reads 28×28
        samples = torch.nn.functional.interpolate(samples.float(), size=(28, 28), mode="bilinear", antialias=True)
    print(evaluate_digits(samples, labels).summary())


def add_sample_commands(sub) -> None:
    s = sub.add_parser("sample", help="sample a grid from a trained run (a text-to-image one with --prompt) or a "
                       "diffusers DDPM/DDIM folder",
                       epilog="A diffusers folder (e.g. google/ddpm-cifar10-32 or google/ddpm-church-256, downloaded) is "
                              "sampled with its scheduler's settings: x0 clipping, DDPM variance, timestep spacing.")
    add_model(s, "run directory, checkpoint file, or diffusers DDPMPipeline/DDIMPipeline/UNet2DModel folder")
    add_sampling(s, None, None, 1.0, 64)
    add_seeds(s)
    add_adapter_options(s)
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic, 1 ≈ DDPM)")
    s.add_argument("--batch-size", type=number(int, 1), default=128,
                   help="samples per UNet batch (lower it to save memory: a 256×256 DDPM model needs about 0.3 GB per sample)")
    s.add_argument("--class", dest="class_label", type=int,
                   help="class label for a class-conditional model (default: every class in turn, a column each)")
    s.add_argument("--prompt", help="what to draw, for a text-to-image model (`ldm train --preset mnist-text`, "
                   "or any Stable Diffusion checkpoint): N images of it in one grid")
    s.add_argument("--negative-prompt", help="with --prompt: what to guide away from (default: the empty prompt)")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--npy", help="also save samples as an N×C×H×W float32 array in [0, 1]")
    s.add_argument("--trajectory", action="store_true", help="also write OUT_trajectory.png and .gif (x_t | predicted x0)")
    add_preview_options(s)
    add_provenance_options(s, reproduces=True)
    s.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--nrow", type=int)
    s.add_argument("--scale", type=int, default=2, help="enlarge the grid image by this factor")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="score MNIST samples with a digit classifier trained on real MNIST",
                       epilog="Reports the share of confidently classified samples, the class spread, a Fréchet "
                              "distance on the classifier's features and, for class-conditional runs, label accuracy.")
    add_model(e, "run directory / checkpoint (samples are drawn) or a samples .npy in [0, 1]")
    add_sampling(e, None, None, 1.0, 1000)
    add_adapter_options(e, embeddings=False)
    e.set_defaults(func=cmd_evaluate)
