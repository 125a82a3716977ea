"""``ldm txt2img``, ``img2img`` and ``inpaint``: one Stable Diffusion call with a prompt, an image, a mask."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from ..provenance import save_png
from ..sampling import default_device
from ..sd_stages import check_refiner
from ..stable_diffusion import StableDiffusion
from .common import (DTYPES, add_adapter_options, add_adapters, add_model, add_preview_options, add_sampling,
                     add_seeds, denoise, load, model_path, number, preview_files, trajectory_path)
from .provenance import add_provenance_options, apply_from_png, settings


def load_sd(args: argparse.Namespace, path: str | None = None) -> StableDiffusion:
    """The command's Stable Diffusion model (or the one at ``path``: the refiner) with its options applied."""
    device = args.device or default_device()
    dtype = DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    options = {k: v for k, v in dict(variant=args.variant, prediction=args.prediction, preset=args.preset).items()
               if v is not None}
    pipe = load(args, path, dtype=dtype, **options)
    if not isinstance(pipe, StableDiffusion):
        raise ValueError(f"{path or model_path(args)} is not a Stable Diffusion checkpoint: use `ldm sample`")
    if args.autocast:
        pipe.autocast = torch.bfloat16
    if args.attention_slice:
        pipe.enable_attention_slicing(args.attention_slice)
    if args.vae_tile is not None:
        pipe.enable_vae_tiling(args.vae_tile)
    if path is None:  # the refiner takes no adapters and no decoder of the base
        add_adapters(pipe, args)
        if args.vae_decoder:
            kind, _, file = args.vae_decoder.partition(":")
            if kind != "tiny" or not file:
                raise ValueError(f"--vae-decoder {args.vae_decoder!r}: expected tiny:PATH (a TAESD)")
            pipe.use_tiny_decoder(file)
    return pipe


def cmd_generate(args: argparse.Namespace) -> None:
    """txt2img, img2img and inpaint: the same pipeline call with an image, a strength or a mask."""
    apply_from_png(args)
    if args.prompt is None:
        raise ValueError("give --prompt (or --from-png IMAGE)")
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
        if args.trajectory or args.hires_scale or args.preview:
            raise ValueError("--refiner makes a two-stage run: leave out --trajectory, --preview and --hires-scale")
        refiner = load_sd(args, args.refiner)
        check_refiner(refiner, f"--refiner {args.refiner}")
    start = time.perf_counter()
    if refiner is not None:
        images = pipe(args.prompt, refiner=refiner, refine_from=args.refine_from, **options)
    elif args.command == "txt2img" and args.hires_scale:
        if args.trajectory or args.preview:
            raise ValueError("--trajectory and --preview show one run, and --hires-scale makes two: leave one out")
        images = pipe.hires(args.prompt, scale=args.hires_scale, strength=args.hires_strength, **options)
    else:
        total = pipe.steps_run(args.steps, options.get("strength", 1.0), options.get("image"))
        records = pipe.loop(args.prompt, preview=args.preview or "auto", **options)
        previews = preview_files(args, pipe, total)
        with torch.inference_mode():
            images = pipe.images(denoise(pipe, records, total, trajectory_path(args), previews), "pil")
    out = Path(args.out)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    out.parent.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or [args.seed + k for k in range(len(images))]
    # txt2img's size is the one asked for (a hires fix's images are larger); the others draw at the image's
    size = (dict(width=args.width or pipe.config.size, height=args.height or pipe.config.size)
            if args.command == "txt2img" else dict(width=images[0].width, height=images[0].height))
    for image, path, seed in zip(images, paths, seeds):  # each PNG records the run that makes it alone
        recorded = settings(args, sampler=args.sampler or pipe.default_sampler, steps=args.steps or
                            pipe.default_steps, guidance_scale=pipe.guidance(args.guidance_scale), seed=seed, seeds=None,
                            n=1, **size)
        save_png(image, path, recorded)
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")


def add_generate_commands(sub) -> None:
    for name, help_ in (("txt2img", "generate images from a prompt with a Stable Diffusion checkpoint"),
                        ("img2img", "redraw an image following a prompt"),
                        ("inpaint", "repaint the white part of a mask")):
        p = sub.add_parser(name, help=help_)
        add_model(p, "single file (.safetensors/.ckpt) or diffusers folder")
        p.add_argument("--prompt", help="what to draw (required unless --from-png gives it)")
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
        add_sampling(p, None, None, None, 1)
        add_preview_options(p)
        add_provenance_options(p, reproduces=name == "txt2img")
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
        p.add_argument("--preset", choices=("sd-turbo", "sdxl-turbo", "none"), help="a distilled model the file cannot "
                       "say it is (a single file named *turbo* is taken as one; none: never)")
        p.add_argument("--vae-decoder", metavar="tiny:PATH", help="decode the final images with TAESD (taesd for SD 1/2, "
                       "taesdxl for SDXL): a file, a pair of encoder/decoder files' folder, or a diffusers folder")
        p.set_defaults(func=cmd_generate)
