"""Sample quality of MNIST runs, judged by ldm.metrics' digit classifier.

    python benchmarks/mnist_quality.py RUN_DIR [RUN_DIR …] [--n 1000] [--samplers ddim:50 ddpm:50 dpm++2m_sde:25]
    python benchmarks/mnist_quality.py --sweep --minutes 5 [--isa avx2]   # train each preset variant, then score it
    python benchmarks/mnist_quality.py --sweep --train-steps 2500         # the same number of steps on any machine

--sweep trains every variant in VARIANTS for the same budget on the bundled MNIST set (this is how
the mnist preset's defaults were chosen) and prints one row per run and sampler. A wall-clock budget
(--minutes) measures what this machine makes of it; a step budget (--train-steps) measures quality per
step, which does not depend on the machine: steps/s from mnist_throughput.py turn it into minutes on
any CPU. --isa avx2 caps the kernels at AVX2 (see mnist_throughput.py). The CPU's features print first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _measure import cap_at_avx2
from ldm import load_pipeline
from ldm.cpu import summary
from ldm.metrics import evaluate_digits, load_classifier
from ldm.train import TrainConfig, train_diffusion

# Each is a change to the mnist preset (TrainConfig.mnist()); README "MNIST recipe" lists their scores.
VARIANTS = {
    "preset": {},  # class-conditional, scored with every class equally often and no guidance
    # the objective and the optimizer (measured by steps: --train-steps 2500 / 5000)
    "unconditional": dict(class_conditional=False),
    "no min-SNR": dict(class_conditional=False, min_snr_gamma=None),
    "lr 2e-3": dict(class_conditional=False, lr=2e-3),
    "batch 32": dict(class_conditional=False, batch_size=32),
    "EMA gamma 3": dict(class_conditional=False, ema_gamma=3.0, ema_decay=0.9999),
    "v-prediction": dict(class_conditional=False, prediction="v"),
    # width, depth and precision (measured by wall clock: --minutes 4)
    "ch32 fp32": dict(mixed_precision="no", unet=dict(channels=32)),
    "ch32 bf16": dict(mixed_precision="bf16", unet=dict(channels=32)),
    "ch16 bf16": dict(mixed_precision="bf16"),
    "ch48 bf16": dict(mixed_precision="bf16", unet=dict(channels=48, norm_groups=16)),
    "ch16 1,2,4 bf16": dict(mixed_precision="bf16", unet=dict(channel_mult=(1, 2, 4))),
    "ch24 1,2,4 bf16": dict(mixed_precision="bf16", unet=dict(channels=24, channel_mult=(1, 2, 4))),
}


def score(run: Path, n: int, sampler: str, classifier, guidance: float = 1.0) -> dict:
    """``sampler``: "name:steps", e.g. "ddpm:50"."""
    model = load_pipeline(run)
    name, steps = sampler.split(":")
    t0 = time.perf_counter()
    labels = None
    if model.unet.config.num_classes:
        labels = torch.arange(n) % model.unet.config.num_classes
    x = model(n, sampler=name, num_inference_steps=int(steps), class_label=labels, guidance_scale=guidance,
              progress=False, output="tensor")
    sample_s = time.perf_counter() - t0
    if x.shape[-2:] != (28, 28):  # latent recipe: 32×32 digits; the classifier reads 28×28
        x = torch.nn.functional.interpolate(x.float(), size=(28, 28), mode="bilinear", antialias=True)
    report = evaluate_digits(x, labels, classifier=classifier)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return {"run": run.name, "sampler": sampler, "step": state["step"], "sample_s": sample_s, "report": report}


def print_row(name: str, r: dict) -> None:
    rep = r["report"]
    acc = f"{rep.label_accuracy:.3f}" if rep.label_accuracy is not None else "—"
    counts = rep.class_counts
    print(f"{name:18s} {r['sampler']:16s} {r['step']:7d} {rep.confident_share:9.3f} "
          f"{min(counts) / rep.n:6.1%}–{max(counts) / rep.n:<6.1%} {rep.frechet_distance:9.2f} {acc:>8s} "
          f"{r['sample_s']:8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--samplers", nargs="+", default=["ddim:50", "ddpm:50", "dpm++2m_sde:25"],
                        help="SAMPLER:STEPS to score each run with")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--train-steps", type=int, help="with --sweep: a step budget instead of --minutes")
    parser.add_argument("--isa", choices=["avx2"], help="cap the kernels at AVX2, as on an AVX2-only CPU")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (class-conditional runs)")
    args = parser.parse_args()
    if args.isa:
        cap_at_avx2()
    print(summary())
    classifier = load_classifier()
    header = (f"{'run':18s} {'sampler':16s} {'steps':>7s} {'confident':>9s} {'classes':^13s} {'Fréchet':>9s} "
              f"{'label acc':>8s} {'sample s':>8s}")
    if args.sweep:
        budget = f"{args.train_steps} steps" if args.train_steps else f"{args.minutes} min"
        print(f"each variant trained for {budget} on the bundled MNIST set; {args.n} samples per sampler")
        print(header)
        for name, change in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            base = TrainConfig.mnist()
            change = dict(change)
            unet = base.unet.with_(**change.pop("unet", {}))
            budget = dict(steps=args.train_steps) if args.train_steps else dict(max_minutes=args.minutes)
            config = base.with_(unet=unet, sample_every=0, **budget, **change)
            run = args.out / name.replace(" ", "-")
            train_diffusion(config, run, overwrite=True, progress=False)  # a re-run of the sweep starts each run over
            for sampler in args.samplers:
                print_row(name, score(run, args.n, sampler, classifier))
    else:
        print(header)
        for run in args.runs:
            for sampler in args.samplers:
                print_row(run.name, score(run, args.n, sampler, classifier, args.guidance))


if __name__ == "__main__":
    main()
