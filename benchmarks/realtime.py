"""What live previews cost beside a UNet step, and what ``torch.compile`` gives that step, on this machine.

    python benchmarks/realtime.py [--quick] [--repeats N] [--no-compile]

On the benchmark weights (``_weights.py``: the SD-Turbo-shaped SD 2.1-base UNet, the SD VAE, a TAESD), for one
512×512 image (a 4×64×64 latent), fp32, ldm alone:

    unet step          one UNet call on batch 1 (an unguided step, as Turbo and LCM run), and batch 2 (a guided one)
    preview: linear    ``LatentRGB`` on x̂₀ and the bilinear enlargement to 512² (``ldm.preview.Previewer("linear")``)
    preview: tiny      TAESD's decoder (``Previewer`` with an ``AutoencoderTiny``), ldm's fast CPU convolutions on
    preview: full      the SD VAE's decode
    compile            the batch-1 step after ``pipe.compile()`` (``torch.compile`` of the plain UNet: ``ldm.perf``'s
                       fast convolutions off) after its warm-up, the warm-up's cost, and both eager paths

Each preview is reported as a share of the unguided step, the worst case (a guided step costs twice as much, so the
share halves). Times are medians of interleaved calls after a warm-up. ``--quick`` runs the quick weights, one
repeat, no compile: a smoke test. Absolute figures depend on the CPU, whose flags are printed first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import machine_info
from ldm.perf import disable_fast_cpu
from _weights import ensure_weights


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile trial")
    parser.add_argument("--vae", type=Path, help="also: how well a linear preview fitted to this `ldm train-vae` run "
                        "reproduces its decoder on the held-out digits")
    args = parser.parse_args(argv)
    if args.vae is not None:
        print(toy_preview_quality(args.vae))
    repeats = 1 if args.quick else args.repeats
    info = machine_info(torch.device("cpu"))
    print(f"CPU: {info['cpu']}, {info['cores']} cores, capability {info['cpu_capability']}, native bf16 "
          f"{info['cpu_bf16']}; torch {info['torch']}; load average {info['load_average']}")
    import ldm

    weights = ensure_weights(args.quick)
    pipe = ldm.load_pipeline(weights / "sd-turbo", device="cpu")
    f = pipe.vae.config.downsample_factor
    size = pipe.config.size if not args.quick else 32
    x = torch.randn(2, 4, size // f, size // f, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, pipe.unet.config.context_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 999])
    steps = {n: timed(lambda n=n: pipe.unet(x[:n], t[:n], context[:n]), repeats) for n in (1, 2)}
    previews = {"linear": pipe.previewer("linear"), "tiny": pipe.previewer(f"tiny:{weights / 'taesd'}"),
                "full": pipe.previewer("full")}
    costs = {name: timed(lambda p=previewer: p(x[:1]), repeats) for name, previewer in previews.items()}
    print(f"\n{size}×{size} image, fp32, torch threads {torch.get_num_threads()}")
    print(f"unet step, batch 1 (unguided): {steps[1]:.3f} s;  batch 2 (guided): {steps[2]:.3f} s")
    for name, seconds in costs.items():
        print(f"preview {name:7s} {seconds:.4f} s  = {100 * seconds / steps[1]:5.1f} % of an unguided step, "
              f"{100 * seconds / steps[2]:5.1f} % of a guided one")
    if args.no_compile or args.quick:
        return
    # ``Pipeline.compile`` compiles the plain UNet (the fast path's per-call filter transforms and size-dependent
    # choices of algorithm would break inductor's graph into pieces and recompile at every width)
    disable_fast_cpu(pipe.unet)
    plain = timed(lambda: pipe.unet(x[:1], t[:1], context[:1]), repeats)
    pipe.compile()
    start = time.perf_counter()
    pipe.unet(x[:1], t[:1], context[:1])
    warmup = time.perf_counter() - start
    seconds = timed(lambda: pipe.unet(x[:1], t[:1], context[:1]), repeats)
    print(f"torch.compile (inductor) of the plain UNet: warm-up {warmup:.0f} s, then {seconds:.3f} s/step; eager "
          f"plain {plain:.3f} s ({100 * (plain - seconds) / plain:+.1f} %), eager with ldm's fast convolutions "
          f"{steps[1]:.3f} s ({100 * (steps[1] - seconds) / steps[1]:+.1f} %)")


def toy_preview_quality(run: Path) -> str:
    """``fit_latent_rgb`` on the first 2,000 bundled digits, scored on the last 500 (the VAE run's held-out set)
    against the full decode: PSNR at the latent's resolution and enlarged bilinearly to the image's."""
    import torch.nn.functional as F

    from ldm.data import load_dataset
    from ldm.preview import fit_latent_rgb, psnr
    from ldm.runs import load_vae

    vae, image_size = load_vae(run)
    digits = load_dataset("mnist-bundled", image_size=image_size, channels=1)
    s = vae.config.scaling_factor

    def encode(images):
        return vae.encode(images).mode() * s

    linear = fit_latent_rgb(encode, digits.batch(torch.arange(2000))[0])
    held_out = digits.batch(torch.arange(len(digits) - 500, len(digits)))[0]
    z = encode(held_out)
    full = vae.decode(z / s).clamp(-1, 1)
    small = linear(z)
    big = F.interpolate(small, size=full.shape[-2:], mode="bilinear").clamp(-1, 1)
    pooled = F.adaptive_avg_pool2d(full, small.shape[-2:])
    return (f"linear preview of {run} (fitted on 2,000 digits, scored on the 500 held out): "
            f"{psnr(small, pooled):.1f} dB against the full decode at {small.shape[-1]}², "
            f"{psnr(big, full):.1f} dB enlarged to {full.shape[-1]}²")


if __name__ == "__main__":
    main()
