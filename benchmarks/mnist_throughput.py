"""Training throughput (images/s) of UNet variants on 28×28 MNIST, to choose the mnist preset.

    python benchmarks/mnist_throughput.py [--repeats 5] [--json out.json]

Each variant: a few warm-up steps, then the median time of ``repeats`` timed blocks of
steps. Prints one row per variant; no assertion. Keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ldm.data import load_dataset
from ldm.train import TrainConfig, Trainer
from ldm.unet import UNetConfig

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
}


def measure(config: TrainConfig, data, repeats: int, steps_per_block: int = 5) -> dict:
    trainer = Trainer(config, "/tmp/ldm-bench-unused", dataset=data, progress=False)
    for _ in range(3):
        trainer.train_step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps_per_block):
            trainer.train_step()
        times.append((time.perf_counter() - t0) / steps_per_block)
    step = statistics.median(times)
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"params_M": params / 1e6, "s_per_step": step, "images_per_s": config.loop.batch_size / step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="variant names to run")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    data = load_dataset("mnist-bundled")
    base = TrainConfig.mnist().with_(mixed_precision="no")
    configs = {name: base.with_(unet=BASE.with_(**ch)) for name, ch in VARIANTS.items()}
    configs.update({name: base.with_(**ch) for name, ch in TRAIN_VARIANTS.items()})
    results = {}
    print(f"{'variant':24s} {'params':>8s} {'s/step':>8s} {'img/s':>8s}")
    for name, config in configs.items():
        if args.only and name not in args.only:
            continue
        r = measure(config, data, args.repeats)
        results[name] = r
        print(f"{name:24s} {r['params_M']:7.2f}M {r['s_per_step']:8.3f} {r['images_per_s']:8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
