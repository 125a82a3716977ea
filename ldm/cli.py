"""The ``ldm`` command line: train, sample, evaluate; Stable Diffusion commands come from ``sd_cli``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError
from .config import parse_value
from .data import DATASETS, DatasetUnavailableError
from .loop import TrainingDiverged
from .samplers import SAMPLERS
from .sd_cli import add_commands
from .train import PRESETS


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
        raise SystemExit(f"expected --field value pairs, got {' '.join(pairs)}")
    for flag, text in zip(pairs[::2], pairs[1::2]):
        if not flag.startswith("--"):
            raise SystemExit(f"expected an option, got {flag!r}")
        name = flag[2:].replace("-", "_")
        section, _, field = name.rpartition(".")
        if not section:
            owners = [s for s, cls in sections.items() if field in {f.name for f in dataclasses.fields(cls)}]
            owners += [""] if field in top else []
            if len(owners) != 1:
                problem = f"unknown option --{field}" if not owners else f"--{field} is ambiguous ({owners}); use a prefix"
                raise SystemExit(f"{problem}\nknown fields: {', '.join(known)}")
            section = owners[0]
        elif section not in sections:
            raise SystemExit(f"unknown option --{name}\nknown fields: {', '.join(known)}")
        try:
            changes[section][field] = parse_value(sections.get(section, type(config)), field, text)
        except ValueError as e:
            raise SystemExit(f"--{name}: {e}") from None
    nested = {name: dataclasses.replace(getattr(config, name), **changes[name]) for name in sections if changes[name]}
    return dataclasses.replace(config, **nested, **changes[""])


def run_config(preset, args: argparse.Namespace, extra: list[str], **direct):
    """A preset with the command's options and ``--field value`` pairs applied; checks budget and resume."""
    direct.update(steps=args.steps, max_minutes=args.max_minutes, dataset=args.dataset, data_dir=args.data_dir)
    config = override_config(preset().with_(**{k: v for k, v in direct.items() if v is not None}), extra)
    if config.loop.steps is None and config.loop.max_minutes is None:
        raise SystemExit("give a budget: --steps N and/or --max-minutes M")
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists():
        raise SystemExit(f"--resume: no checkpoint.pt in {args.out}")
    return config


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    from .train import train

    config = run_config(PRESETS[args.preset], args, extra, vae=args.vae, class_conditional=args.class_conditional or None)
    trainer = train(config, args.out, resume=args.resume, device=args.device)
    if trainer.rank == 0:
        print(f"trained to step {trainer.step}; run directory {args.out} (samples.png, checkpoint.pt, config.json)")


def cmd_sample(args: argparse.Namespace, extra: list[str]) -> None:
    from .images import save_gif, save_grid, save_strip
    from .pipeline import DiffusionPipeline

    if extra:
        raise SystemExit(f"unknown options for sample: {' '.join(extra)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = DiffusionPipeline.from_run(args.run, ema=not args.raw_weights, device=device)
    class_label, num_classes = args.class_label, model.config.unet.num_classes
    if class_label is None and num_classes:  # a class-conditional model: one column per class
        class_label = torch.arange(args.n) % num_classes
        args.nrow = args.nrow or num_classes
    options = dict(sampler=args.sampler, num_inference_steps=args.steps, seed=args.seed, class_label=class_label,
                   guidance=args.guidance)  # the rest (spacing, clipping, DDPM variance) comes from the model's config
    if args.sampler == "ddim":
        options["eta"] = args.eta
    out = Path(args.out)
    if args.trajectory:
        records = []
        with torch.inference_mode():
            from tqdm.auto import tqdm

            for record in tqdm(model.loop(args.n, **options), total=args.steps, desc="sample"):
                records.append((record.t, model.decode(record.x_t[:8]).cpu(), model.decode(record.x0_pred[:8]).cpu()))
            samples = model.decode(record.x_prev)
        keep = np.unique(np.linspace(0, len(records) - 1, min(10, len(records))).round().astype(int))
        first = [torch.stack([records[i][1][0] for i in keep]), torch.stack([records[i][2][0] for i in keep])]
        strip = save_strip(first, out.with_name(out.stem + "_trajectory.png"), scale=3)
        frames = [torch.cat([x, x0], dim=-1) for _, x, x0 in records]  # x_t | x̂_0 side by side
        gif = save_gif(frames, out.with_name(out.stem + "_trajectory.gif"), scale=3)
        print(f"trajectory: {strip} (top: x_t, bottom: predicted x0, at t = {[records[i][0] for i in keep]}), {gif}")
    else:
        samples = model(args.n, batch_size=args.batch_size, **options)
    save_grid(samples, out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {out}")
    if args.npy:
        np.save(args.npy, ((samples.float().cpu().clamp(-1, 1) + 1) / 2).numpy())
        print(f"wrote {args.npy} ({args.n}×{samples.shape[1]}×{samples.shape[2]}×{samples.shape[3]} float32 in [0, 1])")


def cmd_train_vae(args: argparse.Namespace, extra: list[str]) -> None:
    from .train_vae import VAE_PRESETS, train_vae

    trainer = train_vae(run_config(VAE_PRESETS[args.preset], args, extra), args.out, resume=args.resume, device=args.device)
    if trainer.rank == 0:
        metrics = (Path(args.out) / "metrics.json").read_text()
        print(f"trained VAE to step {trainer.step}; run directory {args.out}\n{metrics}")


def cmd_evaluate(args: argparse.Namespace, extra: list[str]) -> None:
    from .metrics import evaluate_digits, load_samples_npy
    from .pipeline import DiffusionPipeline

    if extra:
        raise SystemExit(f"unknown options for evaluate: {' '.join(extra)}")
    source = Path(args.source)
    labels = None
    if source.suffix == ".npy":
        samples = load_samples_npy(source)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = DiffusionPipeline.from_run(source, device=device)
        num_classes = model.config.unet.num_classes
        labels = torch.arange(args.n) % num_classes if num_classes else None  # every class equally often
        samples = model(args.n, sampler=args.sampler, num_inference_steps=args.steps, seed=args.seed,
                        class_label=labels, guidance=args.guidance).cpu()
    if samples.shape[-2:] != (28, 28):  # e.g. the latent recipe's 32×32 digits: the classifier reads 28×28
        samples = torch.nn.functional.interpolate(samples.float(), size=(28, 28), mode="bilinear", antialias=True)
    print(evaluate_digits(samples, labels).summary())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm", description="Readable diffusion models: train, sample, evaluate; Stable Diffusion text-to-image.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a pixel-space diffusion model",
                       epilog="Any config field can be set as --field value (e.g. --lr 5e-4, --unet.channels 64, "
                              "--schedule.kind linear, --prediction v, --mixed-precision bf16).")
    t.add_argument("--preset", choices=sorted(PRESETS), default="mnist")
    t.add_argument("--out", required=True, help="run directory (checkpoint, config, sample grids)")
    t.add_argument("--steps", type=int, help="stop at this many optimizer steps (total, counting resumed ones)")
    t.add_argument("--max-minutes", type=float, help="stop after this many minutes of this invocation")
    t.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}, or a folder of images")
    t.add_argument("--data-dir", help="where datasets are cached / placed by hand")
    t.add_argument("--class-conditional", action="store_true", help="condition on labels (with label dropout for CFG)")
    t.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    t.add_argument("--vae", help="a `ldm train-vae` run directory: train on its latents (latent diffusion)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    t.set_defaults(func=cmd_train)

    from .train_vae import VAE_PRESETS

    v = sub.add_parser("train-vae", help="train the autoencoder for latent diffusion",
                       epilog="Any config field can be set as --field value (e.g. --kl-weight 1e-5, --vae.channels 64, "
                              "--disc-start 2000, --reconstruction l2).")
    v.add_argument("--preset", choices=sorted(VAE_PRESETS), default="mnist")
    v.add_argument("--out", required=True)
    v.add_argument("--steps", type=int)
    v.add_argument("--max-minutes", type=float)
    v.add_argument("--dataset")
    v.add_argument("--data-dir")
    v.add_argument("--resume", action="store_true")
    v.add_argument("--device")
    v.set_defaults(func=cmd_train_vae)

    s = sub.add_parser("sample", help="sample from a trained run or a diffusers DDPM/DDIM folder",
                       epilog="A diffusers folder (e.g. google/ddpm-cifar10-32 or google/ddpm-church-256, downloaded) is "
                              "sampled with its scheduler's settings: x0 clipping, DDPM variance, timestep spacing.")
    s.add_argument("run", help="run directory, checkpoint file, or diffusers DDPMPipeline/DDIMPipeline/UNet2DModel folder")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    s.add_argument("--steps", type=int, default=50, help="number of inference steps")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 deterministic, 1 ≈ DDPM)")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=128,
                   help="samples per UNet batch (lower it to save memory: a 256×256 DDPM model needs about 0.3 GB per sample)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class", dest="class_label", type=int,
                   help="class label for a class-conditional model (default: every class in turn, a column each)")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--out", default="samples.png")
    s.add_argument("--npy", help="also save samples as an N×C×H×W float32 array in [0, 1]")
    s.add_argument("--trajectory", action="store_true", help="also write OUT_trajectory.png and .gif (x_t | predicted x0)")
    s.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--nrow", type=int)
    s.add_argument("--scale", type=int, default=2, help="enlarge the grid image by this factor")
    s.add_argument("--device")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="score MNIST samples with a digit classifier trained on real MNIST",
                       epilog="Reports the share of confidently classified samples, the class spread, a Fréchet "
                              "distance on the classifier's features and, for class-conditional runs, label accuracy.")
    e.add_argument("source", help="run directory / checkpoint (samples are drawn) or a samples .npy in [0, 1]")
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--guidance", type=float, default=1.0)
    e.add_argument("--device")
    e.set_defaults(func=cmd_evaluate)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        args.func(args, extra)
    except (ValueError, FileNotFoundError, CheckpointError, DatasetUnavailableError, TrainingDiverged) as e:
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
