"""The ``ldm`` command line: train, train-vae, sample, evaluate, txt2img, img2img, inpaint, inspect, convert.

One grammar for all: the model is the positional MODEL (or ``--checkpoint MODEL``), ``--n`` is the number of
images written, ``--guidance`` is the classifier-free guidance scale, ``--trajectory`` writes OUT_trajectory.png
and .gif, and an unknown option is an error that names it (``train`` and ``train-vae`` take any config field
as ``--field value``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import CheckpointError
from .config import parse_value
from .convert.lora import describe_lora, looks_like_lora
from .data import DATASETS, DatasetUnavailableError
from .embeddings import describe_embedding, looks_like_embedding
from .images import save_gif, save_grid, save_strip
from .loading import load_pipeline
from .loop import TrainingDiverged
from .metrics import evaluate_digits, load_samples_npy
from .pipeline import DiffusionPipeline
from .run_dir import BACKUP, check_run_dir
from .runs import CHECKPOINT, CONFIG
from .samplers import ALIASES, SAMPLER_NAMES, SAMPLERS, SIGMA_SAMPLERS, SIGMA_SCHEDULES, resolve_sampler, run_to_end
from .sampling import default_device
from .sd_checkpoint import inspect_checkpoint, save_diffusers_folder, save_single_file
from .stable_diffusion import StableDiffusion, check_refiner
from .train import PRESETS, train_diffusion
from .train_vae import VAE_PRESETS, train_vae


def override_config(config, pairs: list[str]):
    """Apply ``--field value`` pairs to a config: its own fields, or fields of its nested configs as
    ``--unet.channels`` / ``--schedule.kind`` / ``--loop.lr`` (the prefix may be dropped when the name
    is unambiguous). Hyphens and underscores are interchangeable."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    sections = {name: type(getattr(config, name)) for name in fields if dataclasses.is_dataclass(getattr(config, name))}
    top = set(fields) - set(sections)
    known = sorted(top) + [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]
    changes: dict[str, dict] = {"": {}, **{name: {} for name in sections}}
    if len(pairs) % 2:
        raise ValueError(f"expected --field value pairs, got {' '.join(pairs)}")
    for flag, text in zip(pairs[::2], pairs[1::2]):
        if not flag.startswith("--"):
            raise ValueError(f"expected an option, got {flag!r}")
        name = flag[2:].replace("-", "_")
        section, _, field = name.rpartition(".")
        if not section:
            owners = [s for s, cls in sections.items() if field in {f.name for f in dataclasses.fields(cls)}]
            owners += [""] if field in top else []
            if len(owners) != 1:
                problem = f"unknown option --{field}" if not owners else f"--{field} is ambiguous ({owners}); use a prefix"
                raise ValueError(f"{problem}\nknown fields: {', '.join(known)}")
            section = owners[0]
        elif section not in sections:
            raise ValueError(f"unknown option --{name}\nknown fields: {', '.join(known)}")
        try:
            changes[section][field] = parse_value(sections.get(section, type(config)), field, text)
        except ValueError as e:
            raise ValueError(f"--{name}: {e}") from None
    nested = {name: dataclasses.replace(getattr(config, name), **changes[name]) for name in sections if changes[name]}
    return dataclasses.replace(config, **nested, **changes[""])


def run_config(preset, args: argparse.Namespace, extra: list[str], **direct):
    """A preset with the command's options and ``--field value`` pairs applied; checks the budget and, before any
    data loads, the run directory (writable; an existing run needs --resume or --overwrite)."""
    direct.update(steps=args.steps, max_minutes=args.max_minutes, dataset=args.dataset, data_dir=args.data_dir)
    config = override_config(preset().with_(**{k: v for k, v in direct.items() if v is not None}), extra)
    if config.loop.steps is None and config.loop.max_minutes is None:
        raise ValueError("give a budget: --steps N and/or --max-minutes M")
    if args.resume and not (Path(args.out) / CHECKPOINT).exists():
        raise ValueError(f"--resume: no {CHECKPOINT} in {args.out} (drop --resume to start a new run there)")
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    return config


def run_summary(trainer, command: str) -> str:
    """What a training command leaves: its step and the files it wrote."""
    written = [name for name in ("samples.png", CHECKPOINT, CONFIG, "metrics.json") if (trainer.out_dir / name).exists()]
    return f"{command} to step {trainer.step}; run directory {trainer.out_dir} ({', '.join(written)})"


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    config = run_config(PRESETS[args.preset], args, extra, vae=args.vae, class_conditional=args.class_conditional or None)
    trainer = train_diffusion(config, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if trainer.rank == 0:
        print(run_summary(trainer, "trained"))


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


def denoise(pipe, records, total: int, trajectory: Path | None, keep: int = 10) -> torch.Tensor:
    """Run ``loop``'s records to the end (progress bar) and decode the result, (B, C, H, W) in [−1, 1].

    With ``trajectory`` (OUT_trajectory) also write how the samples emerge, at ≤ ``keep`` evenly spaced steps:
    a PNG strip of the first sample (top x_t, bottom x̂_0) and a GIF of the first ≤ 8 samples (x_t | x̂_0)."""
    kept = set(np.linspace(0, total - 1, min(keep, total)).round().astype(int).tolist())
    frames = []

    def collect(record) -> None:
        if trajectory is not None and record.index in kept:
            frames.append((record.t, pipe.decode(record.x_t[:8]).cpu(), pipe.decode(record.x0_pred[:8]).cpu()))

    last = run_to_end(records, total, True, "denoise", collect)
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


def cmd_sample(args: argparse.Namespace) -> None:
    pipe = load(args)
    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError(f"{model_path(args)} is a Stable Diffusion checkpoint: use `ldm txt2img`")
    add_adapters(pipe, args)
    args.n = len(args.seeds) if args.seeds else args.n
    class_label, num_classes = args.class_label, pipe.unet.config.num_classes
    if class_label is None and num_classes:  # a class-conditional model: one column per class
        class_label = torch.arange(args.n) % num_classes
        args.nrow = args.nrow or num_classes
    # the rest (spacing, clipping, DDPM variance) comes from the model
    options = dict(sampler=args.sampler, sigmas=args.sigmas, num_inference_steps=args.steps, seed=args.seed,
                   seeds=args.seeds, class_label=class_label, guidance_scale=args.guidance_scale)
    if resolve_sampler(args.sampler)[0] == "ddim":
        options["eta"] = args.eta
    out = Path(args.out)
    if args.trajectory:
        with torch.inference_mode():
            samples = denoise(pipe, pipe.loop(args.n, **options), args.steps, trajectory_path(args))
    else:
        samples = pipe(args.n, batch_size=args.batch_size, output="tensor", **options)
    save_grid(samples, out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {out}")
    if args.npy:
        np.save(args.npy, ((samples.float().cpu().clamp(-1, 1) + 1) / 2).numpy())
        print(f"wrote {args.npy} ({args.n}×{samples.shape[1]}×{samples.shape[2]}×{samples.shape[3]} float32 in [0, 1])")


def cmd_train_vae(args: argparse.Namespace, extra: list[str]) -> None:
    trainer = train_vae(run_config(VAE_PRESETS[args.preset], args, extra), args.out, resume=args.resume,
                        overwrite=args.overwrite, device=args.device)
    if trainer.rank == 0:
        print(f"{run_summary(trainer, 'trained VAE')}\n{(trainer.out_dir / 'metrics.json').read_text()}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    labels = None
    if Path(model_path(args)).suffix == ".npy":
        samples = load_samples_npy(model_path(args))
    else:
        pipe = load(args)
        add_adapters(pipe, args)
        num_classes = pipe.unet.config.num_classes
        labels = torch.arange(args.n) % num_classes if num_classes else None  # every class equally often
        samples = pipe(args.n, sampler=args.sampler, sigmas=args.sigmas, num_inference_steps=args.steps, seed=args.seed,
                       class_label=labels, guidance_scale=args.guidance_scale, output="tensor").cpu()
    if samples.shape[-2:] != (28, 28):  # e.g. the latent recipe's 32×32 digits: the classifier reads 28×28
        samples = torch.nn.functional.interpolate(samples.float(), size=(28, 28), mode="bilinear", antialias=True)
    print(evaluate_digits(samples, labels).summary())


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_sd(args: argparse.Namespace, path: str | None = None) -> StableDiffusion:
    """The command's Stable Diffusion model (or the one at ``path``: the refiner) with its options applied."""
    device = args.device or default_device()
    dtype = DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    options = {k: v for k, v in dict(variant=args.variant, prediction=args.prediction).items() if v is not None}
    pipe = load(args, path, dtype=dtype, **options)
    if not isinstance(pipe, StableDiffusion):
        raise ValueError(f"{path or model_path(args)} is not a Stable Diffusion checkpoint: use `ldm sample`")
    if args.autocast:
        pipe.autocast = torch.bfloat16
    if args.attention_slice:
        pipe.enable_attention_slicing(args.attention_slice)
    if args.vae_tile is not None:
        pipe.enable_vae_tiling(args.vae_tile)
    if path is None:  # the refiner takes no adapters of the base
        add_adapters(pipe, args)
    return pipe


def cmd_generate(args: argparse.Namespace) -> None:
    """txt2img, img2img and inpaint: the same pipeline call with an image, a strength or a mask."""
    pipe = load_sd(args)
    options = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   sampler=args.sampler, sigmas=args.sigmas, seed=args.seed, seeds=args.seeds,
                   num_images_per_prompt=len(args.seeds) if args.seeds else args.n, guidance_rescale=args.guidance_rescale)
    options["clip_skip"] = args.clip_skip
    if args.command == "txt2img":
        options |= dict(width=args.width, height=args.height)
    else:
        options["image"] = image = Image.open(args.image).convert("RGB")
        if args.command == "img2img":
            options["strength"] = args.strength
        else:
            options["mask"] = mask = Image.open(args.mask).convert("L")
            if mask.size != image.size:
                raise ValueError(f"mask is {mask.width}×{mask.height} but the image is {image.width}×{image.height}")
    refiner = None
    if args.command == "txt2img" and args.refiner:
        if args.trajectory or args.hires_scale:
            raise ValueError("--refiner makes a two-stage run: leave out --trajectory and --hires-scale")
        refiner = load_sd(args, args.refiner)
        check_refiner(refiner, f"--refiner {args.refiner}")
    start = time.perf_counter()
    if refiner is not None:
        images = pipe(args.prompt, refiner=refiner, refine_from=args.refine_from, **options)
    elif args.command == "txt2img" and args.hires_scale:
        if args.trajectory:
            raise ValueError("--trajectory shows one run, and --hires-scale makes two: leave one of them out")
        images = pipe.hires(args.prompt, scale=args.hires_scale, strength=args.hires_strength, **options)
    else:
        total = pipe.steps_run(args.steps, options.get("strength", 1.0), options.get("image"))
        with torch.inference_mode():
            images = pipe.images(denoise(pipe, pipe.loop(args.prompt, **options), total, trajectory_path(args)), "pil")
    out = Path(args.out)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        image.save(path)
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")


def cmd_inspect(args: argparse.Namespace) -> None:
    path = model_path(args)
    if looks_like_lora(path) or looks_like_embedding(path):
        report = describe_lora(path) if looks_like_lora(path) else describe_embedding(path)
        print(json.dumps(report, indent=2) if args.json else f"{path}: {adapter_summary(report)}")
        return
    report = inspect_checkpoint(path)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['path']}: {report['format']}, family {report['family']}{', with EMA weights' if report['ema'] else ''}")
    for name, count in report["parameters"].items():
        print(f"  {name:13s} {count / 1e6:8.1f} M parameters  {', '.join(report['dtypes'][name])}")
    for note in report["notes"]:
        print(f"  {note}")
    if report["unrecognised"]:
        shown, more = report["unrecognised"][:20], len(report["unrecognised"]) > 20
        print(f"  unrecognised ({len(report['unrecognised'])}): {', '.join(shown)}{' …' if more else ''}")


def adapter_summary(report: dict) -> str:
    """One line on a LoRA (``describe_lora``) or an embedding (``describe_embedding``)."""
    if report.get("kind") == "LoRA":
        parts = ", ".join(f"{name} {count}" for name, count in report["layers"].items())
        alphas = ", ".join("none (= rank)" if a is None else f"{a:g}" for a in report["alphas"])
        return (f"LoRA, {report['format']} layout, for {report['family']}; rank {', '.join(map(str, report['ranks']))}, "
                f"alpha {alphas}; {sum(report['layers'].values())} layers ({parts}), "
                f"{report['conv_layers']} of them k×k convolutions")
    widths = ", ".join(f"{name} {width}" for name, width in report["widths"].items())
    return (f"textual-inversion embedding, {report['format']} format, for {report['family_name'] or 'unknown family'}; "
            f"token {report['token']!r}, {report['vectors_per_token']} vector(s) per token, width {widths}"
            + (f", trained {report['step']} steps" if report.get("step") else ""))


def cmd_convert(args: argparse.Namespace) -> None:
    options = {} if args.prediction is None else dict(prediction=args.prediction)
    pipe = load(args, device="cpu", dtype=DTYPES[args.dtype], **options)
    out = Path(args.out)
    written = save_single_file(pipe, out) if out.suffix == ".safetensors" else save_diffusers_folder(pipe, out)
    print(f"wrote {written}")


def add_model(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", help=what)
    p.add_argument("--checkpoint", help="the model, as an option instead of MODEL")


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


def add_sampling(p: argparse.ArgumentParser, sampler: str, steps: int, guidance: float, n: int) -> None:
    """The options every sampling command shares, with that command's defaults."""
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=sampler, metavar="SAMPLER",
                   help=f"one of {', '.join(SAMPLERS)}, or as UIs name them: {', '.join(map(repr, ALIASES))} "
                        f"(default {sampler})")
    p.add_argument("--sigmas", choices=SIGMA_SCHEDULES, help="σ schedule for the σ-space samplers "
                   f"({', '.join(SIGMA_SAMPLERS)}): Karras et al.'s ρ = 7, log-uniform or Beta(0.6, 0.6) spacing")
    p.add_argument("--steps", type=number(int, 1), default=steps, help="number of inference steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", "--guidance-scale", dest="guidance_scale", type=number(float, 0), default=guidance,
                   help="classifier-free guidance scale ≥ 0 (1 = off, 0 = unconditional)")
    p.add_argument("--n", type=number(int, 1), default=n, help="number of images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")


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


def add_training(sub, name: str, presets, help_: str, epilog: str) -> argparse.ArgumentParser:
    t = sub.add_parser(name, help=help_, epilog=f"{epilog} An OUT that already holds a run is refused unless you add "
                       "--resume (continue it) or --overwrite (start it over). A checkpoint is written every 500 steps "
                       "or 5 minutes (--checkpoint-every, --checkpoint-minutes), and on Ctrl-C or SIGTERM.")
    t.add_argument("--preset", choices=sorted(presets), default="mnist")
    t.add_argument("--out", required=True, help="run directory (checkpoint, config, sample grids); if it already "
                   "holds a run, give --resume or --overwrite")
    t.add_argument("--steps", type=number(int, 1), help="stop at this many optimizer steps (total, counting resumed ones)")
    t.add_argument("--max-minutes", type=number(float, 0, inclusive=False),
                   help="stop after this many minutes of this invocation")
    t.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}, or a folder of images")
    t.add_argument("--data-dir", help="where datasets are cached / placed by hand")
    t.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true", help=f"start the run in OUT over (its checkpoint is kept as "
                   f"{BACKUP} until the new run's first save)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    return t


def add_sample_commands(sub) -> None:
    s = sub.add_parser("sample", help="sample from a trained run or a diffusers DDPM/DDIM folder",
                       epilog="A diffusers folder (e.g. google/ddpm-cifar10-32 or google/ddpm-church-256, downloaded) is "
                              "sampled with its scheduler's settings: x0 clipping, DDPM variance, timestep spacing.")
    add_model(s, "run directory, checkpoint file, or diffusers DDPMPipeline/DDIMPipeline/UNet2DModel folder")
    add_sampling(s, "ddim", 50, 1.0, 64)
    add_seeds(s)
    add_adapter_options(s)
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic, 1 ≈ DDPM)")
    s.add_argument("--batch-size", type=number(int, 1), default=128,
                   help="samples per UNet batch (lower it to save memory: a 256×256 DDPM model needs about 0.3 GB per sample)")
    s.add_argument("--class", dest="class_label", type=int,
                   help="class label for a class-conditional model (default: every class in turn, a column each)")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--npy", help="also save samples as an N×C×H×W float32 array in [0, 1]")
    s.add_argument("--trajectory", action="store_true", help="also write OUT_trajectory.png and .gif (x_t | predicted x0)")
    s.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--nrow", type=int)
    s.add_argument("--scale", type=int, default=2, help="enlarge the grid image by this factor")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="score MNIST samples with a digit classifier trained on real MNIST",
                       epilog="Reports the share of confidently classified samples, the class spread, a Fréchet "
                              "distance on the classifier's features and, for class-conditional runs, label accuracy.")
    add_model(e, "run directory / checkpoint (samples are drawn) or a samples .npy in [0, 1]")
    add_sampling(e, "ddim", 50, 1.0, 1000)
    add_adapter_options(e, embeddings=False)
    e.set_defaults(func=cmd_evaluate)


def add_generate_commands(sub) -> None:
    for name, help_ in (("txt2img", "generate images from a prompt with a Stable Diffusion checkpoint"),
                        ("img2img", "redraw an image following a prompt"),
                        ("inpaint", "repaint the white part of a mask")):
        p = sub.add_parser(name, help=help_)
        add_model(p, "single file (.safetensors/.ckpt) or diffusers folder")
        p.add_argument("--prompt", required=True)
        p.add_argument("--negative-prompt", default=None)
        if name == "txt2img":
            p.add_argument("--width", type=int, help="default: the model's training size (512 SD 1, 768 SD 2-v, 1024 SDXL)")
            p.add_argument("--height", type=int)
            p.add_argument("--hires-scale", type=number(float, 1), help="hires fix: generate at the size, upscale the "
                           "images by this factor and redraw them there with img2img (e.g. 2)")
            p.add_argument("--hires-strength", type=number(float, 0), default=0.5,
                           help="the hires fix's img2img strength (default 0.5)")
            p.add_argument("--refiner", help="an SDXL refiner (single file or diffusers folder) to run the last steps")
            p.add_argument("--refine-from", type=float, default=0.8, help="with --refiner: the fraction of the "
                           "denoising the base runs before the refiner takes over, in (0, 1) (default 0.8)")
        else:
            p.add_argument("--image", required=True, help="input image (its size is the output size; multiples of 8)")
        if name == "img2img":
            p.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 ignores it")
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="grayscale mask, white = repaint, same size as the image")
        add_sampling(p, "dpm++2m", 25, 7.5, 1)
        add_seeds(p)
        add_adapter_options(p)
        p.add_argument("--guidance-rescale", type=float, default=0.0,
                       help="φ in [0, 1]: temper strong guidance (0.7 suits zero-terminal-SNR v-models)")
        p.add_argument("--clip-skip", type=int, default=1, help="read the text encoders N−1 blocks early (2: A1111's "
                       "CLIP skip 2, SD 1's penultimate block; 1: the model's own layer)")
        p.add_argument("--out", default=f"{name}.png", help="the image (several: OUT_0.png, OUT_1.png …)")
        p.add_argument("--trajectory", action="store_true", help="also write OUT_trajectory.png and .gif (x_t | predicted x0)")
        p.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default fp16 on CUDA, fp32 on CPU)")
        p.add_argument("--autocast", action="store_true", help="run the UNet under bf16 autocast (fast on CPUs with bf16)")
        p.add_argument("--attention-slice", type=int, help="attend this many positions at a time (less memory)")
        p.add_argument("--vae-tile", type=int, help="encode and decode in tiles of this many latent pixels "
                       "(8× as many image pixels; large images, less memory; 64 is a good start)")
        p.add_argument("--variant", help="diffusers weight variant to prefer, e.g. fp16")
        p.add_argument("--raw-weights", action="store_true", help="single files: the non-EMA UNet weights")
        p.add_argument("--prediction", choices=("eps", "v"), help="what the UNet predicts, when the checkpoint cannot "
                       "say (SD 2 single files; the loader prints what it chose and why)")
        p.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="what a Stable Diffusion checkpoint, LoRA or embedding file holds")
    add_model(i, "single file, diffusers folder, LoRA or textual-inversion embedding")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="single file ↔ diffusers folder (OUT ending in .safetensors: single file)")
    add_model(c, "single file or diffusers folder")
    c.add_argument("out")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    c.add_argument("--raw-weights", action="store_true", help="single files: the non-EMA UNet weights")
    c.add_argument("--prediction", choices=("eps", "v"), help="ε or v, written into the folder's scheduler config")
    c.set_defaults(func=cmd_convert)


# --- ldm finetune ---------------------------------------------------------------------------------------------
FINETUNE_FIELDS = ("data", "method", "caption", "class_data", "class_caption", "prior_weight", "limit", "resolution",
                   "rank", "alpha", "targets", "train_text_encoder", "token", "init_word", "vectors", "min_snr_gamma",
                   "grad_accum", "diffusers_format", "sample_prompt", "sample_n", "sample_steps", "sample_every_minutes")
FINETUNE_LOOP_FIELDS = ("steps", "max_minutes", "lr", "batch_size", "mixed_precision", "ema_decay", "seed",
                        "gradient_checkpointing")


def cmd_finetune(args: argparse.Namespace) -> None:
    """LoRA, textual inversion or full fine-tuning of any model ldm loads, on a folder of images (``ldm.finetune``)."""
    from .finetune import FinetuneConfig, finetune

    if args.steps is None and args.max_minutes is None:
        raise ValueError("give a budget: --steps N and/or --max-minutes M")
    if args.resume and not (Path(args.out) / CHECKPOINT).exists():
        raise ValueError(f"--resume: no {CHECKPOINT} in {args.out} (drop --resume to start a new run there)")
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    config = FinetuneConfig(checkpoint=model_path(args), **{name: getattr(args, name) for name in FINETUNE_FIELDS})
    config = config.with_(**{k: v for k in FINETUNE_LOOP_FIELDS if (v := getattr(args, k)) is not None})
    tuner = finetune(config, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    print(f"fine-tuned to step {tuner.step}; run directory {tuner.out_dir}\n{tuner.usage()}")


def add_finetune_command(sub) -> None:
    f = sub.add_parser("finetune", help="adapt a model to your own images: LoRA, textual inversion or full",
                       epilog="--data is a folder of images (captions in same-named .txt files, or one --caption for "
                              "all) or mnist-bundled:D (the bundled MNIST test set's digit D). An OUT that already holds "
                              "a run is refused unless you add --resume or --overwrite.")
    add_model(f, "the base: SD single file or diffusers folder, or an `ldm train` run directory")
    f.add_argument("--data", required=True, help="folder of images (+ .txt captions), or mnist-bundled:D")
    f.add_argument("--method", choices=("lora", "textual-inversion", "full"), default="lora")
    f.add_argument("--out", required=True, help="run directory (checkpoint, outputs, sample grids)")
    f.add_argument("--steps", type=number(int, 1), help="stop at this many optimizer steps (total, counting resumed ones)")
    f.add_argument("--max-minutes", type=number(float, 0, inclusive=False), help="stop after this many minutes")
    f.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    f.add_argument("--overwrite", action="store_true", help="start the run in OUT over")
    f.add_argument("--caption", help='one caption for every image, e.g. "a photo of sks dog" (DreamBooth)')
    f.add_argument("--class-data", help="prior preservation: a folder of images of the class (or mnist-bundled:D)")
    f.add_argument("--class-caption", help='their caption, e.g. "a photo of a dog"')
    f.add_argument("--prior-weight", type=number(float, 0), default=1.0, help="λ, the class images' loss weight")
    f.add_argument("--limit", type=number(int, 1), help="use at most this many images of each folder")
    f.add_argument("--resolution", type=number(int, 8), help="image side (default: the model's); resized "
                   "keeping the aspect ratio, then center-cropped")
    f.add_argument("--rank", type=number(int, 1), default=4, help="LoRA rank r")
    f.add_argument("--alpha", type=number(float, 0, inclusive=False), help="LoRA α (default: r)")
    f.add_argument("--targets", choices=("attention", "transformer", "attention+conv"),
                   help="layers LoRA adapts (default: attention for SD, attention+conv for toy runs)")
    f.add_argument("--train-text-encoder", action="store_true", help="SD: also train the text encoder(s)")
    f.add_argument("--token", default="<sks>", help="textual inversion: the new word")
    f.add_argument("--init-word", help="textual inversion: start from this word's embedding (toy runs: a class label)")
    f.add_argument("--vectors", type=number(int, 1), default=1, help="textual inversion: vectors per token")
    f.add_argument("--lr", type=number(float, 0, inclusive=False), help="learning rate (default: per method)")
    f.add_argument("--batch-size", type=number(int, 1), help="images per step (default 1 for SD, 8 for toy runs)")
    f.add_argument("--grad-accum", type=number(int, 1), default=1, help="batches per optimizer step")
    f.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more compute")
    f.add_argument("--mixed-precision", choices=("no", "bf16", "fp16", "auto"), help="autocast (default no)")
    f.add_argument("--ema-decay", type=number(float, 0), help="EMA of the trained weights (default 0: none)")
    f.add_argument("--min-snr-gamma", type=number(float, 0, inclusive=False), help="Min-SNR-γ loss weighting")
    f.add_argument("--seed", type=int)
    f.add_argument("--sample-prompt", help="SD: the prompt of the sample grids (default: the first caption)")
    f.add_argument("--sample-n", type=number(int, 0), default=4, help="images per sample grid (0: none)")
    f.add_argument("--sample-steps", type=number(int, 1), default=20)
    f.add_argument("--sample-every-minutes", type=number(float, 0, inclusive=False),
                   help="a sample grid every this many minutes (default: only at the end)")
    f.add_argument("--diffusers-format", action="store_true", help="LoRA: also write pytorch_lora_weights.safetensors")
    f.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    f.set_defaults(func=cmd_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm", description="Readable diffusion models: train, sample, evaluate; Stable Diffusion text-to-image.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = add_training(sub, "train", PRESETS, "train a pixel-space or latent diffusion model",
                     "Any config field can be set as --field value (e.g. --lr 5e-4, --unet.channels 64, "
                     "--schedule.kind linear, --prediction v, --mixed-precision bf16).")
    t.add_argument("--class-conditional", action="store_true", help="condition on labels (with label dropout for CFG)")
    t.add_argument("--vae", help="a `ldm train-vae` run directory: train on its latents (latent diffusion)")
    t.set_defaults(func=cmd_train)
    v = add_training(sub, "train-vae", VAE_PRESETS, "train the autoencoder for latent diffusion",
                     "Any config field can be set as --field value (e.g. --kl-weight 1e-5, --vae.channels 64, "
                     "--disc-start 2000, --reconstruction l2).")
    v.set_defaults(func=cmd_train_vae)
    add_sample_commands(sub)
    add_generate_commands(sub)
    add_finetune_command(sub)
    return parser


TRAINING_COMMANDS = ("train", "train-vae")  # these take config fields as --field value; the others take no extras


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in TRAINING_COMMANDS:
        parser.error(f"unrecognized arguments for {args.command}: {' '.join(extra)}")
    try:
        if args.command in TRAINING_COMMANDS:
            args.func(args, extra)
        else:
            args.func(args)
    except (ValueError, FileNotFoundError, CheckpointError, DatasetUnavailableError, TrainingDiverged) as e:
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
