"""Training throughput (images/s) of UNet variants on 28×28 MNIST, to choose the mnist preset.

    python benchmarks/mnist_throughput.py [--repeats 5] [--only NAME …] [--isa avx2] [--json out.json]

Each variant: a few warm-up steps (for the compiled ones, the first step's compilation is reported
apart), then the median time of ``repeats`` timed blocks of steps. Prints the CPU's features first and
one row per variant; no assertion. Keep the machine otherwise idle.

``--isa avx2`` runs the whole table as an AVX2-only CPU would: torch's own kernels (ATEN_CPU_CAPABILITY),
oneDNN's convolutions (ONEDNN_MAX_CPU_ISA) and MKL's matmuls (MKL_ENABLE_INSTRUCTIONS) are capped at AVX2,
so bf16 is no longer native and ``mixed_precision="auto"`` trains in fp32. The clock and caches stay this
machine's, so absolute figures are an AVX-512 machine's running AVX2 code, not an AVX2 machine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from _measure import cap_at_avx2
from ldm.cpu import native_bf16, summary
from ldm.data import load_dataset
from ldm.pipeline import DiffusionPipeline
from ldm.train import TrainConfig, Trainer
from ldm.unet import UNet, UNetConfig

BASE = UNetConfig.mnist()
# UNet changes to the mnist preset (16 channels, mult 1,2,2, attention at 7×7, fp32 here unless a
# training variant below says otherwise).
VARIANTS = {
    "preset": {},
    "ch32": dict(channels=32),
    "ch48": dict(channels=48, norm_groups=16),
    "ch64": dict(channels=64, norm_groups=16),
    "2 res blocks": dict(num_res_blocks=2),
    "no attention": dict(attention=(False, False, False), mid_attention=False),
    "attn 14x14": dict(attention=(False, True, True)),
    "mult 1,2,4": dict(channel_mult=(1, 2, 4)),
}
TRAIN_VARIANTS = {
    "batch 32": dict(batch_size=32),
    "batch 128": dict(batch_size=128),
    "bf16 autocast": dict(mixed_precision="bf16"),
    "channels-last": dict(channels_last=True),
    "bf16 + channels-last": dict(mixed_precision="bf16", channels_last=True),
    "compile": dict(compile=True),
    "bf16 + compile": dict(mixed_precision="bf16", compile=True),
}
# Changes to the trainer itself rather than its config.
TRAINER_VARIANTS = {
    "AdamW unfused": lambda t: setattr(t, "optimizer", torch.optim.AdamW(t.model.parameters(), lr=t.config.loop.lr)),
}


def measure(config: TrainConfig, data, repeats: int, steps_per_block: int = 5, patch=None) -> dict:
    trainer = Trainer(config, "/tmp/ldm-bench-unused", dataset=data, progress=False)
    if patch is not None:
        patch(trainer)
    t0 = time.perf_counter()
    trainer.train_step()
    first = time.perf_counter() - t0
    for _ in range(2):
        trainer.train_step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps_per_block):
            trainer.train_step()
        times.append((time.perf_counter() - t0) / steps_per_block)
    step = statistics.median(times)
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"params_M": params / 1e6, "first_step_s": first, "s_per_step": step,
            "images_per_s": config.loop.batch_size / step}


def measure_sampling(compiled: bool, n: int = 256, steps: int = 25) -> dict:
    """Seconds for n samples of the preset UNet (random weights: speed only) with the default sampler, after one
    warm-up batch (which, compiled, includes the compilation, reported apart)."""
    pipe = DiffusionPipeline(UNet(BASE))
    if compiled:
        pipe.compile()
    t0 = time.perf_counter()
    pipe(n, num_inference_steps=steps, progress=False, output="tensor")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe(n, num_inference_steps=steps, seed=n, progress=False, output="tensor")
    seconds = time.perf_counter() - t0
    return {"first_s": first, "seconds": seconds, "images_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="variant names to run")
    parser.add_argument("--isa", choices=["avx2"], help="cap the kernels at AVX2, as on an AVX2-only CPU")
    parser.add_argument("--sampling", action="store_true", help="also time sampling, eager and compiled")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.isa:
        cap_at_avx2()
    print(summary())
    data = load_dataset("mnist-bundled")
    base = TrainConfig.mnist().with_(mixed_precision="no")
    configs = {name: base.with_(unet=BASE.with_(**ch)) for name, ch in VARIANTS.items()}
    configs.update({name: base.with_(**ch) for name, ch in TRAIN_VARIANTS.items()})
    configs.update({name: base for name in TRAINER_VARIANTS})
    results = {}
    print(f"{'variant':24s} {'params':>8s} {'1st step s':>10s} {'s/step':>8s} {'img/s':>8s}")
    for name, config in configs.items():
        if args.only and name not in args.only:
            continue
        if config.loop.mixed_precision == "bf16" and not native_bf16():  # emulated: minutes a step, and meaningless
            print(f"{name:24s} skipped: bf16 is emulated on this CPU")
            continue
        r = measure(config, data, args.repeats, patch=TRAINER_VARIANTS.get(name))
        results[name] = r
        print(f"{name:24s} {r['params_M']:7.2f}M {r['first_step_s']:10.1f} {r['s_per_step']:8.3f} "
              f"{r['images_per_s']:8.1f}", flush=True)
    if args.sampling:
        print(f"\nsampling 256 images, {DiffusionPipeline.default_sampler} {DiffusionPipeline.default_steps} steps")
        for compiled in (False, True):
            name = "sampling " + ("compiled" if compiled else "eager")
            r = results[name] = measure_sampling(compiled)
            print(f"{name:24s} first call {r['first_s']:6.1f} s, then {r['seconds']:6.1f} s = {r['images_per_s']:6.1f} img/s",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
