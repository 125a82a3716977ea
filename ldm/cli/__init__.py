"""The ``ldm`` command line: train, train-vae, finetune, sample, evaluate, txt2img, img2img, inpaint, inspect, convert,
info, studio.

One grammar for all: the model is the positional MODEL (or ``--checkpoint MODEL``), ``--n`` is the number of
images written, ``--guidance`` is the classifier-free guidance scale, ``--trajectory`` writes OUT_trajectory.png
and .gif, ``--preview`` keeps OUT.preview.png showing the image as it forms, and an unknown option is an error that
names it (``train`` and ``train-vae`` take any config field as ``--field value``). One module per family of
commands: ``train`` (train, train-vae, finetune), ``sample`` (sample, evaluate), ``generate`` (txt2img, img2img,
inpaint), ``checkpoints`` (inspect, convert), ``provenance`` (info, and the settings every PNG records),
``studio``; ``common`` holds what they share.
"""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import CheckpointError
from ..data import DatasetUnavailableError
from ..loop import TrainingDiverged
from .checkpoints import add_checkpoint_commands
from .generate import add_generate_commands
from .provenance import add_info_command
from .studio import add_studio_command
from .sample import add_sample_commands
from .train import add_training_commands, override_config

__all__ = ["build_parser", "main", "override_config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm", description="Readable diffusion models: train, sample, evaluate; Stable Diffusion text-to-image.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_training_commands(sub)
    add_sample_commands(sub)
    add_generate_commands(sub)
    add_checkpoint_commands(sub)
    add_info_command(sub)
    add_studio_command(sub)
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
