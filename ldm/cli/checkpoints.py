"""``ldm inspect`` and ``ldm convert``: what a checkpoint, LoRA or embedding holds; single file ↔ diffusers folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..convert.lora import describe_lora, looks_like_lora
from ..embeddings import describe_embedding, looks_like_embedding
from ..sd_checkpoint import inspect_checkpoint, save_diffusers_folder, save_single_file
from .common import DTYPES, add_model, load, model_path


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


def add_checkpoint_commands(sub) -> None:
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
