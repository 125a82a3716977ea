"""How well a tiny text-to-image model (``ldm.mnist_text``) draws what its prompts say.

    python benchmarks/mnist_text_quality.py RUN/model [--n 1000] [--guidance 3] [--steps 25]

Digits: n samples, one for each of n training captions (100 per digit, seeded: "a thick 7 on the left", "the digit 3",
…) — as text-to-image models are scored on their dataset's captions — read by ldm's digit classifier
(``ldm.metrics.evaluate_digits``): how often the named digit, and the Fréchet distance to the 10,000 captioned
training digits, the distribution these captions come from. (Real MNIST, centred, is no reference here: 4 in 5 training
digits are moved 3 or 4 px sideways, and their captions say so; the distance to it is printed too.)
Attributes: for every digit and every attribute pair (thick / thin, slanted right / left, large / small, on the right
/ on the left), the same seeds drawn with each side's prompt; a pair counts when the attribute measured on the
samples (``ldm.data.digits.measure_digits``, mean over the seeds) moves the way the words say. Prints the CPU line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import machine_info  # noqa: E402

PAIRS = {"thickness": ("thick", "thin"), "slant": ("slanted right", "slanted left"), "size": ("large", "small"),
         "x": ("on the right", "on the left")}


def draw(pipe, prompts: list[str], seeds: list[int], guidance: float, steps: int) -> torch.Tensor:
    """One image per (prompt, seed), as digits (N, 1, 28, 28) in [−1, 1] and as drawn (for measuring)."""
    out = []
    for i in range(0, len(prompts), 50):
        batch = prompts[i:i + 50]
        out.append(pipe(batch, seeds=seeds[i:i + 50], guidance_scale=guidance, num_inference_steps=steps,
                        output="tensor", progress=False).float().cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--pairs-seeds", type=int, default=8, help="seeds per prompt in each attribute pair")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    import ldm
    from ldm.data.captions import captioned_mnist
    from ldm.data.digits import NUMBER_WORDS, measure_digits
    from ldm.metrics import evaluate_digits

    info = machine_info(torch.device("cpu"))
    print(f"CPU: {info['cpu']}, {info['cores']} cores, capability {info['cpu_capability']}, native bf16 "
          f"{info['cpu_bf16']}; torch {info['torch']}")
    pipe = ldm.load_pipeline(args.model, device="cpu")
    data = captioned_mnist(resolution=pipe.config.size)
    g = torch.Generator().manual_seed(0)
    per_digit = []  # n/10 captions of each digit, drawn at random (seeded)
    for d in range(10):
        members = (data.labels == d).nonzero().flatten()
        per_digit.append(members[torch.randperm(len(members), generator=g)[: -(-args.n // 10)]])
    picked = torch.cat(per_digit)[: args.n]
    labels, prompts = data.labels[picked], [data.captions[i] for i in picked.tolist()]
    samples = draw(pipe, prompts, list(range(args.n)), args.guidance, args.steps)
    def as_digits(x: torch.Tensor) -> torch.Tensor:  # 32² samples → the classifier's 28² (as `ldm evaluate` does)
        return F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True).clamp(-1, 1)

    trained_on = as_digits(data.images.float() / 127.5 - 1)
    report = replace(evaluate_digits(as_digits(samples), labels, reference=trained_on),
                     frechet_reference=f"the {len(trained_on):,} moved training digits")
    to_real = evaluate_digits(as_digits(samples)).frechet_distance
    print(f"\ndigits: {args.n} samples of training captions (e.g. {prompts[0]!r}), guidance {args.guidance}, {args.steps} steps\n{report.summary()}\n"
          f"  (to real MNIST: {to_real:.1f}, where the training digits themselves are at "
          f"{evaluate_digits(trained_on).frechet_distance:.1f})")

    moved, total = {name: 0 for name in PAIRS}, 0
    seeds = list(range(10_000, 10_000 + args.pairs_seeds))
    for d in range(10):
        for name, (high, low) in PAIRS.items():
            sides = []
            for words in (high, low):
                # as the captions say it: sizes and thicknesses before the number, slants and places after it
                prompt = f"a {words} {NUMBER_WORDS[d]}" if name in ("thickness", "size") else f"a {NUMBER_WORDS[d]} {words}"
                drawn = draw(pipe, [prompt] * len(seeds), seeds, args.guidance, args.steps)
                u = ((drawn.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                sides.append(getattr(measure_digits(u), name).mean().item())
            moved[name] += sides[0] > sides[1]
        total += 1
    print(f"\nattributes: the measured attribute moves the named way, of {total} digits per pair "
          f"({args.pairs_seeds} seeds a side)")
    for name, (high, low) in PAIRS.items():
        print(f"  {high} vs {low}: {moved[name]}/{total}")
    share = sum(moved.values()) / (total * len(PAIRS))
    print(f"  all pairs: {share:.0%}")


if __name__ == "__main__":
    main()
