"""``ldm train``, ``ldm train-vae`` and ``ldm finetune``: budgets, run directories, and any config field as
``--field value``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ..config import parse_value
from ..data import DATASETS
from ..run_dir import BACKUP, check_run_dir
from ..runs import CHECKPOINT, CONFIG
from ..train import PRESET_REASONS, PRESETS, describe_config, train_diffusion
from ..train_vae import VAE_PRESETS, train_vae
from .common import add_model, boolean, model_path, number

TEXT_PRESET = "mnist-text"  # the tiny text-to-image model: ldm.mnist_text, not a TrainConfig


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
    if args.preset == TEXT_PRESET:
        return cmd_train_text(args, extra)
    config = run_config(PRESETS[args.preset], args, extra, vae=args.vae, class_conditional=args.class_conditional)
    reason = PRESET_REASONS.get(args.preset)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"preset {args.preset}: {describe_config(config)}" + (f"; {reason}" if reason else ""))
    trainer = train_diffusion(config, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if trainer.rank == 0:
        print(run_summary(trainer, "trained"))


def cmd_train_text(args: argparse.Namespace, extra: list[str]) -> None:
    """The tiny text-to-image model (``ldm.mnist_text``): Stable Diffusion's classes on a train-vae run's latents."""
    from ..mnist_text import train

    if not args.vae:
        raise ValueError("--preset mnist-text draws in a VAE's latents: give --vae VAE_RUN (ldm train-vae --preset mnist)")
    if extra or args.dataset or args.class_conditional is not None:
        given = " ".join(extra) or ("--dataset" if args.dataset else "--class-conditional")
        raise ValueError(f"--preset mnist-text takes its data (mnist-text captions) and settings as they are; "
                         f"{given} is not for it")
    if args.steps is None and args.max_minutes is None:
        raise ValueError("give a budget: --steps N and/or --max-minutes M")
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    tuner = train(args.vae, args.out, steps=args.steps, max_minutes=args.max_minutes, resume=args.resume,
                  overwrite=args.overwrite)
    print(f"trained to step {tuner.step}; the model is {Path(args.out) / 'model'} (a Stable Diffusion folder: "
          f"ldm txt2img {Path(args.out) / 'model'} --prompt \"a thick seven\")")


def cmd_train_vae(args: argparse.Namespace, extra: list[str]) -> None:
    trainer = train_vae(run_config(VAE_PRESETS[args.preset], args, extra), args.out, resume=args.resume,
                        overwrite=args.overwrite, device=args.device)
    if trainer.rank == 0:
        print(f"{run_summary(trainer, 'trained VAE')}\n{(trainer.out_dir / 'metrics.json').read_text()}")


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


# --- ldm finetune ---------------------------------------------------------------------------------------------
FINETUNE_FIELDS = ("data", "method", "caption", "class_data", "class_caption", "prior_weight", "limit", "resolution",
                   "rank", "alpha", "targets", "train_text_encoder", "token", "init_word", "vectors", "min_snr_gamma",
                   "caption_dropout", "grad_accum", "diffusers_format", "sample_prompt", "sample_n", "sample_steps", "sample_every_minutes")


FINETUNE_LOOP_FIELDS = ("steps", "max_minutes", "lr", "batch_size", "mixed_precision", "ema_decay", "seed",
                        "gradient_checkpointing")


def cmd_finetune(args: argparse.Namespace) -> None:
    """LoRA, textual inversion or full fine-tuning of any model ldm loads, on a folder of images (``ldm.finetune``)."""
    from ..finetune import FinetuneConfig, finetune

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
    f.add_argument("--data", required=True, help="folder of images (+ .txt captions), mnist-bundled:D, or mnist-text (every "
                   "digit, captioned by its looks)")
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
    f.add_argument("--caption-dropout", type=float, default=0.0, help="SD: train this share of captions as the empty "
                   "prompt, the unconditional model classifier-free guidance needs (e.g. 0.1 when training from scratch)")
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


def add_training_commands(sub) -> None:
    t = add_training(sub, "train", {**PRESETS, TEXT_PRESET: None}, "train a pixel-space or latent diffusion model",
                     "Any config field can be set as --field value (e.g. --lr 5e-4, --unet.channels 64, "
                     "--schedule.kind linear, --prediction v, --mixed-precision bf16).")
    t.add_argument("--class-conditional", nargs="?", const="true", type=boolean, metavar="true|false",
                   help="condition on labels, with label dropout for CFG (the mnist and mnist-latent presets do; "
                        "false: an unconditional model)")
    t.add_argument("--vae", help="a `ldm train-vae` run directory: train on its latents (latent diffusion)")
    t.set_defaults(func=cmd_train)
    v = add_training(sub, "train-vae", VAE_PRESETS, "train the autoencoder for latent diffusion",
                     "Any config field can be set as --field value (e.g. --kl-weight 1e-5, --vae.channels 64, "
                     "--disc-start 2000, --reconstruction l2).")
    v.set_defaults(func=cmd_train_vae)
    add_finetune_command(sub)
