"""Seconds per Stable Diffusion 1.5 UNet step at 512×512 with classifier-free guidance, ldm beside diffusers.

    python benchmarks/sd_unet.py [--size 512] [--repeats 3] [--modes fp32,bf16-autocast,bf16] [--device cpu]

One guided step = one UNet call on a batch of 2 (conditional + unconditional) 4×64×64 latents with a
77×768 context. Both libraries run the same random weights (diffusers' initialisation with seed 0,
copied into ldm through the diffusers rule table). Each (library, mode) runs in its own process so
its peak memory is its own: the peak resident set while stepping (weights included), reset after
building the model. Prints a table and the ldm/diffusers time ratio; no assertion. Keep the machine idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def peak_rss_reset() -> None:
    """Linux: make VmHWM (peak resident set) start again from the current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def build(library: str, dtype: torch.dtype, device: str):
    import diffusers

    from ldm.convert import import_state_dict, unet_config_from_diffusers, unet_layout
    from ldm.unet import UNet

    torch.manual_seed(0)
    config = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    if library == "diffusers":
        return ref.to(device, dtype), lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample
    ours_config = unet_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = UNet(ours_config)
    import_state_dict(ours, ref.state_dict(), unet_layout(ours_config, "diffusers"), "diffusers UNet", assign=True)
    del ref
    return ours.eval().to(device, dtype), lambda m, x, t, c: m(x, t, c)


def run_one(library: str, mode: str, size: int, repeats: int, device: str) -> dict:
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model, call = build(library, dtype, device)
    x = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    c = torch.randn(2, 77, 768, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16-autocast")
    if device == "cpu":
        peak_rss_reset()
    else:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode(), autocast:
        for i in range(repeats + 1):  # the first call warms up kernels and allocator
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call(model, x, t, c)
            if device != "cpu":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    peak = peak_rss_gib() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**30
    return {"library": library, "mode": mode, "seconds": statistics.median(times), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="fp32,bf16-autocast,bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("LIBRARY", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.size, args.repeats, args.device)))
        return
    rows = []
    for mode in args.modes.split(","):
        for library in ("ldm", "diffusers"):
            cmd = [sys.executable, __file__, "--one", library, mode, "--size", str(args.size),
                   "--repeats", str(args.repeats), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['library']:9s} {r['mode']:14s} {r['seconds']:7.2f} s/step  peak {r['peak_gib']:5.2f} GiB", flush=True)
    print(f"\nSD 1.5 UNet, {args.size}×{args.size}, guided step (batch 2), {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| mode | ldm s/step | diffusers s/step | ldm / diffusers | ldm peak GiB | diffusers peak GiB |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        a, b = (next(r for r in rows if r["library"] == lib and r["mode"] == mode) for lib in ("ldm", "diffusers"))
        print(f"| {mode} | {a['seconds']:.2f} | {b['seconds']:.2f} | {a['seconds'] / b['seconds']:.2f} | "
              f"{a['peak_gib']:.2f} | {b['peak_gib']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
