"""Peak memory and time of Stable Diffusion 1.5 text-to-image at 1024×1024 on the CPU (random weights).

    python benchmarks/sd_memory.py [--size 1024] [--steps 1] [--dtype bf16|fp32] [--no-slicing] [--no-tiling]

Builds full-size SD 1.5 — ``UNetConfig.sd15()``, ``VAEConfig.sd()``, the CLIP ViT-L/14 text encoder, 1.07 B
parameters — with random weights (memory and time do not depend on the values), turns on attention slicing
(``--slice`` queries at a time) and VAE tiling (``--tile`` latent pixels) unless told not to, and runs one
guided text-to-image: prompt encoding and ``--steps`` sampler steps (batch 2: conditional + unconditional),
then the VAE decode. It prints the resident memory after building (the weights) and the peak resident set
(Linux VmHWM, reset by writing 5 to /proc/self/clear_refs) of each phase — weights included, so the
larger of the two is what the machine must have — and each phase's time. No assertion; keep the machine idle.

At 1024² the latents are 128×128, so every attention layer of the UNet's first level and the VAE's mid
block attends over 16,384 positions: a score matrix that is materialised whole takes 16,384² · 4 bytes =
1 GiB per head and image in fp32 — the UNet has 8 heads and a batch of 2 — which is what slicing bounds;
the VAE decoder's full-resolution activations (128 channels × 1024², 512 MiB each in fp32) are what tiling
bounds.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time

import torch

from ldm.sd_config import StableDiffusionConfig
from ldm.stable_diffusion import StableDiffusion
from ldm.text_encoder import TextEncoder
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet
from ldm.vae import AutoencoderKL

from _measure import peak_gib, reset_peak  # the benchmark suite's peak-memory helpers, beside this file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU = torch.device("cpu")


def resident_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def build(dtype: torch.dtype) -> StableDiffusion:
    """SD 1.5 with PyTorch's default random initialisation, each model cast as soon as it is built so the
    float32 copies of all three never coexist; what is freed is handed back to the OS before measuring."""
    config = StableDiffusionConfig.sd15()
    torch.manual_seed(0)
    models = [make(c).eval().to(dtype) for make, c in
              ((TextEncoder, config.text), (UNet, config.unet), (AutoencoderKL, config.vae))]
    gc.collect()
    try:  # glibc keeps freed heap pages resident; without this the baseline would include the fp32 copies
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return StableDiffusion(CLIPTokenizer.from_bundled(), *models, config)


def measured(phase):
    """Run ``phase()``: (its result, seconds, peak resident GiB during it)."""
    reset_peak(CPU)
    start = time.perf_counter()
    result = phase()
    return result, time.perf_counter() - start, peak_gib(CPU)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image width and height (multiple of 8)")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps (each is a guided UNet call on batch 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype (the VAE's too)")
    parser.add_argument("--slice", type=int, default=1024, help="attention slice: queries attended at a time")
    parser.add_argument("--tile", type=int, default=64, help="VAE tile in latent pixels (64 = 512 image pixels)")
    parser.add_argument("--no-slicing", action="store_true", help="attend all positions at once")
    parser.add_argument("--no-tiling", action="store_true", help="decode the whole image at once")
    parser.add_argument("--sampler", default="dpm++2m")
    args = parser.parse_args()

    start = time.perf_counter()
    pipe = build(DTYPES[args.dtype])
    built, weights = time.perf_counter() - start, resident_gib()
    pipe.enable_attention_slicing(None if args.no_slicing else args.slice)
    pipe.enable_vae_tiling(None if args.no_tiling else args.tile)

    def denoise() -> torch.Tensor:
        record = None
        for record in pipe.loop("a lighthouse on a cliff at dawn, oil painting", width=args.size, height=args.size,
                                num_inference_steps=args.steps, sampler=args.sampler, seed=0):
            pass
        return record.x_prev

    latents, denoise_s, denoise_peak = measured(denoise)
    image, decode_s, decode_peak = measured(lambda: pipe.decode(latents))
    assert image.shape == (1, 3, args.size, args.size)

    print(f"SD 1.5 txt2img {args.size}×{args.size}, {args.dtype}, {args.steps} {args.sampler} step(s), guided (batch 2); "
          f"attention slice {'off' if args.no_slicing else args.slice}, VAE tile {'off' if args.no_tiling else args.tile}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  built in {built:.0f} s; resident after building (weights): {weights:.2f} GiB")
    print(f"  prompt + {args.steps} step(s): {denoise_s:7.1f} s   peak resident {denoise_peak:6.2f} GiB")
    print(f"  VAE decode:        {decode_s:7.1f} s   peak resident {decode_peak:6.2f} GiB")
    print(f"  total:             {denoise_s + decode_s:7.1f} s   peak resident {max(denoise_peak, decode_peak):6.2f} GiB")


if __name__ == "__main__":
    main()
