"""The Stable Diffusion commands of the ``ldm`` CLI: txt2img, img2img, inpaint, inspect, convert."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .samplers import SAMPLERS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load(args: argparse.Namespace):
    from .sd_checkpoint import load_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    pipe = load_pipeline(args.checkpoint, device=device, dtype=dtype, ema=not args.raw_weights, variant=args.variant,
                         prediction=args.prediction)
    for note in pipe.notes:
        print(f"{pipe.config.family}: {note}")
    if args.autocast:
        pipe.autocast = torch.bfloat16
    if args.attention_slice:
        pipe.enable_attention_slicing(args.attention_slice)
    if args.vae_tile is not None:
        pipe.enable_vae_tiling(args.vae_tile)
    return pipe


def generate(args: argparse.Namespace, extra: list[str]) -> None:
    pipe = load(args)
    options = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   sampler=args.sampler, seed=args.seed, num_images_per_prompt=args.n, guidance_rescale=args.guidance_rescale)
    if args.command == "txt2img":
        options |= dict(width=args.width, height=args.height)
    else:
        image = Image.open(args.image).convert("RGB")
        options |= dict(image=image, width=image.width, height=image.height)
        if args.command == "img2img":
            options["strength"] = args.strength
        else:
            mask = Image.open(args.mask).convert("L")
            if mask.size != image.size:
                raise ValueError(f"mask is {mask.width}×{mask.height} but the image is {image.width}×{image.height}")
            options["mask"] = mask
    start = time.perf_counter()
    records = []
    for record in tqdm(pipe.loop(args.prompt, **options), total=pipe.steps_run(**options), desc="denoise"):
        if args.trajectory:
            records.append(record.x0_pred)
    images = pipe.to_pil(pipe.decode(record.x_prev))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    if args.trajectory:  # decoded x̂_0 at a handful of steps: how the image emerges
        keep = sorted({round(i * (len(records) - 1) / 7) for i in range(8)})
        frames = torch.cat([pipe.decode(records[i][:1]) for i in keep])
        from .images import save_grid

        save_grid(frames, out.with_name(f"{out.stem}_trajectory.png"), nrow=len(keep))
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")


def cmd_inspect(args: argparse.Namespace, extra: list[str]) -> None:
    from .sd_checkpoint import inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['path']}: {report['format']}, family {report['family']}{', with EMA weights' if report['ema'] else ''}")
    for name, count in report["parameters"].items():
        print(f"  {name:13s} {count / 1e6:8.1f} M parameters  {', '.join(report['dtypes'][name])}")
    for note in report["notes"]:
        print(f"  {note}")
    if report["unrecognised"]:
        shown = report["unrecognised"][:20]
        print(f"  unrecognised ({len(report['unrecognised'])}): {', '.join(shown)}{' …' if len(report['unrecognised']) > 20 else ''}")


def cmd_convert(args: argparse.Namespace, extra: list[str]) -> None:
    from .sd_checkpoint import load_pipeline, save_diffusers_folder, save_single_file

    pipe = load_pipeline(args.checkpoint, ema=not args.raw_weights, dtype=DTYPES[args.dtype], prediction=args.prediction)
    out = Path(args.out)
    written = save_single_file(pipe, out) if out.suffix == ".safetensors" else save_diffusers_folder(pipe, out)
    print(f"wrote {written}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    for name, help_ in (("txt2img", "generate images from a prompt with a Stable Diffusion checkpoint"),
                        ("img2img", "redraw an image following a prompt"),
                        ("inpaint", "repaint the white part of a mask (inpainting checkpoint)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--checkpoint", required=True, help="single file (.safetensors/.ckpt) or diffusers folder")
        p.add_argument("--prompt", required=True)
        p.add_argument("--negative-prompt", default=None)
        if name == "txt2img":
            p.add_argument("--width", type=int, help="default: the model's training size (512 SD 1, 768 SD 2-v, 1024 SDXL)")
            p.add_argument("--height", type=int)
        else:
            p.add_argument("--image", required=True, help="input image (its size is the output size; multiples of 8)")
        if name == "img2img":
            p.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 ignores it")
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="grayscale mask, white = repaint, same size as the image")
        p.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpm++2m")
        p.add_argument("--steps", type=int, default=25)
        p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
        p.add_argument("--guidance-rescale", type=float, default=0.0,
                       help="φ in [0, 1]: temper strong guidance (0.7 suits zero-terminal-SNR v-models)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--n", type=int, default=1, help="images per prompt")
        p.add_argument("--out", default=f"{name}.png")
        p.add_argument("--trajectory", action="store_true", help="also write OUT_trajectory.png (decoded x̂0 over the steps)")
        p.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default fp16 on CUDA, fp32 on CPU)")
        p.add_argument("--autocast", action="store_true", help="run the UNet under bf16 autocast (fast on CPUs with bf16)")
        p.add_argument("--attention-slice", type=int, help="attend this many positions at a time (less memory)")
        p.add_argument("--vae-tile", type=int, help="encode and decode in tiles of this many latent pixels "
                       "(8× as many image pixels; large images, less memory; 64 is a good start)")
        p.add_argument("--variant", help="diffusers weight variant to prefer, e.g. fp16")
        p.add_argument("--raw-weights", action="store_true", help="single files: the non-EMA UNet weights")
        p.add_argument("--prediction", choices=("eps", "v"), help="what the UNet predicts, when the checkpoint cannot "
                       "say (SD 2 single files; the loader prints what it chose and why)")
        p.add_argument("--device")
        p.set_defaults(func=generate)

    i = sub.add_parser("inspect", help="what a Stable Diffusion checkpoint holds")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="single file ↔ diffusers folder (OUT ending in .safetensors: single file)")
    c.add_argument("checkpoint")
    c.add_argument("out")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    c.add_argument("--raw-weights", action="store_true", help="single files: the non-EMA UNet weights")
    c.add_argument("--prediction", choices=("eps", "v"), help="ε or v, written into the folder's scheduler config")
    c.set_defaults(func=cmd_convert)
