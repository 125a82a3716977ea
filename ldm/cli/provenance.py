"""Settings in every PNG the commands write, read back by ``--from-png`` and ``ldm info`` (``ldm.provenance``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..provenance import infotext, model_sha256, read_settings
from .common import model_path

_SD = ("prompt", "negative_prompt", "steps", "sampler", "sigmas", "guidance_scale", "seed", "guidance_rescale",
       "clip_skip", "dtype", "autocast", "attention_slice", "vae_tile", "variant", "raw_weights", "prediction", "preset",
       "vae_decoder", "lora", "embedding")
# The options that decide a command's pixels: recorded in every PNG it writes, and what --from-png restores.
RECORDED = {
    "txt2img": (*_SD, "width", "height", "hires_scale", "hires_strength", "refiner", "refine_from"),
    "img2img": (*_SD, "image", "strength"),
    "inpaint": (*_SD, "image", "mask"),
    "sample": ("prompt", "negative_prompt", "sampler", "sigmas", "steps", "seed", "seeds", "n", "class_label", "guidance_scale", "eta", "raw_weights",
               "lora", "embedding", "nrow", "scale"),
}
# What a UI's parameters text can set (``parse_infotext``'s keys) for each command that reads one.
FROM_INFOTEXT = ("prompt", "negative_prompt", "steps", "sampler", "sigmas", "guidance_scale", "seed", "width", "height",
                 "clip_skip", "guidance_rescale")


def add_provenance_options(p: argparse.ArgumentParser, reproduces: bool) -> None:
    p.add_argument("--no-metadata", action="store_true", help="write PNGs without the settings they were made with")
    if reproduces:
        p.add_argument("--from-png", metavar="IMAGE", help="make IMAGE again: its settings (ldm's, or a UI's "
                       "parameters: prompts, steps, sampler, CFG, seed, size), except those given here (e.g. --seed "
                       "for a variation); the model defaults to the one it records")


def settings(args: argparse.Namespace, **resolved: Any) -> dict[str, Any] | None:
    """What the command's PNG records (``recorded``), with ``resolved`` (the values the model's defaults gave, one
    image's seed) in place of the command line's; None with --no-metadata."""
    if args.no_metadata:
        return None
    options = {name: getattr(args, name, None) for name in RECORDED[args.command]}
    return recorded(args.command, model_path(args), **(options | resolved))


def recorded(command: str, model: str | Path, **options: Any) -> dict[str, Any]:
    """The settings a PNG records for ``ldm COMMAND MODEL`` with these options, the rest at the command's defaults:
    the command, the model (name, path, SHA-256) and every option in ``RECORDED[command]``, so that ``--from-png``
    runs the same command again (the studio's PNGs too)."""
    model = Path(model)
    parser = _command_parser(command)
    values = {name: options.get(name, parser.get_default(name)) for name in RECORDED[command]}
    for name in ("image", "mask", "refiner"):
        if values.get(name):
            values[name] = str(Path(values[name]).resolve())
    extra = {k: v for k, v in options.items() if k not in values}  # e.g. the size an img2img image gave
    return {"command": command, "model": model.stem if model.is_file() else model.resolve().name,
            "model_path": str(model.resolve()), "model_sha256": model_sha256(model), **values, **extra}


def apply_from_png(args: argparse.Namespace) -> None:
    """Fill ``args`` from ``--from-png``'s settings; warn when the model is not the one the image was made with."""
    if not getattr(args, "from_png", None):
        return
    found = read_settings(args.from_png)
    if found["source"] == "ldm":
        if found.get("command") != args.command:
            raise ValueError(f"{args.from_png} was made by `ldm {found.get('command')}`: use that command")
        names = RECORDED[args.command]
    else:
        if args.command != "txt2img":
            raise ValueError(f"{args.from_png} holds a UI's text-to-image settings: use `ldm txt2img --from-png`")
        names = FROM_INFOTEXT
    parser = _command_parser(args.command)
    actions = {action.dest: action for action in parser._actions}
    for name in names:  # an option the command line set (to other than its default) wins over the image's
        if name in found and getattr(args, name, None) == parser.get_default(name):
            setattr(args, name, _restored(actions[name], found[name], args.from_png))
    if args.model is None and args.checkpoint is None:
        if "model_path" not in found:
            raise ValueError(f"{args.from_png} names model {found.get('model', '?')!r} (hash "
                             f"{found.get('model_hash', '?')}) but not where it is: give the model")
        if not Path(found["model_path"]).exists():
            raise ValueError(f"{args.from_png} was made with {found['model_path']}, which is not there: give the model")
        args.model = found["model_path"]
    recorded_hash = found.get("model_sha256") or found.get("model_hash")
    if recorded_hash:
        actual = model_sha256(model_path(args))
        if not actual.startswith(recorded_hash.lower()):
            print(f"ldm {args.command}: warning: {model_path(args)} has SHA-256 {actual[:10]}…, but {args.from_png} "
                  f"was made with {recorded_hash[:10]}…: the image will differ", file=sys.stderr)


def _restored(action: argparse.Action, value: Any, png: str) -> Any:
    """A recorded value read back as the command line reads the option (its type, its choices), so a hand-edited
    or hostile PNG cannot hand the command a value the option would refuse."""
    def parse(text: str) -> Any:
        parsed = action.type(text) if action.type else text
        if action.choices is not None and parsed not in action.choices:
            raise ValueError(text)
        return parsed

    def as_text(v: Any) -> str:  # lists as typed: seeds 3,17 and a LoRA as FILE:SCALE
        return (":" if action.dest == "lora" else ",").join(map(str, v)) if isinstance(v, list) else str(v)

    if value is None:
        return None
    try:
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if isinstance(action, argparse._AppendAction):
            if not isinstance(value, list):
                raise ValueError(value)
            return [parse(as_text(v)) for v in value]
        return parse(as_text(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        flag = action.option_strings[0] if action.option_strings else action.dest
        raise ValueError(f"{png}: its {action.dest} ({str(value)[:40]!r}) is not a value {flag} takes") from None


def _command_parser(command: str) -> argparse.ArgumentParser:
    from . import build_parser  # the package's parser, which imports this module

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def cmd_info(args: argparse.Namespace) -> None:
    found = read_settings(args.image)
    source = found.pop("source")
    if source == "ldm":
        print(infotext(found))
        print(f"\nldm {found.get('ldm_version', '?')} settings:")
        print(json.dumps(found, indent=2, ensure_ascii=False))
        print(f"\nagain: ldm {found.get('command', 'txt2img')} --from-png {args.image}")
    else:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        print(f"\nagain: ldm txt2img MODEL --from-png {args.image}")


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="the settings an image was made with (ldm's PNGs, and the common UIs')")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_info)
