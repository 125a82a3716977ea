"""Sample quality of MNIST runs, judged by ldm.metrics' digit classifier.

    python benchmarks/mnist_quality.py RUN_DIR [RUN_DIR …] [--n 1000] [--steps 50]
    python benchmarks/mnist_quality.py --sweep --minutes 5      # train each preset variant, then score it

--sweep trains every variant in VARIANTS for the same wall-clock budget on the bundled
MNIST set (this is how the mnist preset's defaults were chosen) and prints one row per run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ldm.metrics import evaluate_digits, load_classifier
from ldm import load_pipeline
from ldm.train import TrainConfig, train_diffusion

# Each is a change to the mnist preset (TrainConfig.mnist()); README "MNIST recipe" lists their scores.
VARIANTS = {
    "ch32 fp32": dict(mixed_precision="no", unet=dict(channels=32)),
    "ch32 bf16": dict(mixed_precision="bf16", unet=dict(channels=32)),
    "ch16 bf16": dict(mixed_precision="bf16"),
    "ch48 bf16": dict(mixed_precision="bf16", unet=dict(channels=48, norm_groups=16)),
    "ch16 1,2,4 bf16": dict(mixed_precision="bf16", unet=dict(channel_mult=(1, 2, 4))),
    "ch24 1,2,4 bf16": dict(mixed_precision="bf16", unet=dict(channels=24, channel_mult=(1, 2, 4))),
}


def score(run: Path, n: int, steps: int, classifier, guidance: float = 1.0) -> dict:
    model = load_pipeline(run)
    t0 = time.perf_counter()
    labels = None
    if model.unet.config.num_classes:
        labels = torch.arange(n) % model.unet.config.num_classes
    x = model(n, num_inference_steps=steps, class_label=labels, guidance_scale=guidance, progress=False, output="tensor")
    sample_s = time.perf_counter() - t0
    if x.shape[-2:] != (28, 28):  # latent recipe: 32×32 digits; the classifier reads 28×28
        x = torch.nn.functional.interpolate(x.float(), size=(28, 28), mode="bilinear", antialias=True)
    report = evaluate_digits(x, labels, classifier=classifier)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return {"run": run.name, "step": state["step"], "sample_s": sample_s, "report": report}


def print_row(name: str, r: dict) -> None:
    rep = r["report"]
    acc = f"{rep.label_accuracy:.3f}" if rep.label_accuracy is not None else "—"
    print(f"{name:18s} {r['step']:7d} {rep.confident_share:9.3f} {rep.class_entropy:8.3f} "
          f"{rep.frechet_distance:9.2f} {acc:>8s} {r['sample_s']:8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (class-conditional runs)")
    args = parser.parse_args()
    classifier = load_classifier()
    header = f"{'run':18s} {'steps':>7s} {'confident':>9s} {'entropy':>8s} {'Fréchet':>9s} {'label acc':>8s} {'sample s':>8s}"
    if args.sweep:
        print(f"each variant trained {args.minutes} min on the bundled MNIST set; {args.n} samples, DDIM {args.steps} steps")
        print(header)
        for name, change in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            base = TrainConfig.mnist()
            change = dict(change)
            unet = base.unet.with_(**change.pop("unet", {}))
            config = base.with_(unet=unet, max_minutes=args.minutes, sample_every=0, **change)
            run = args.out / name.replace(" ", "-")
            train_diffusion(config, run, overwrite=True, progress=False)  # a re-run of the sweep starts each run over
            print_row(name, score(run, args.n, args.steps, classifier))
    else:
        print(header)
        for run in args.runs:
            print_row(run.name, score(run, args.n, args.steps, classifier, args.guidance))


if __name__ == "__main__":
    main()
