"""ldm beside diffusers, on the same random weights: speed, peak memory and output agreement in one table.

    python benchmarks/run.py [--quick] [--json out.json] [--rows a,b,...] [--repeats N] [--device cpu|cuda]

Rows (full size; ``--quick`` runs reduced models of the same families, as a smoke test):

    unet-fp32         SD 1.5 UNet, one guided step: batch 2 (classifier-free guidance) of 4×64×64 latents,
                      77×768 context, fp32
    unet-bf16         the same with bf16 weights (both libraries ``.to(torch.bfloat16)``)
    vae-decode        SD VAE decode of one 4×64×64 latent to a 512×512 image, fp32
    text-encoder      CLIP ViT-L/14 text encoder (ldm ``TextEncoder`` vs transformers ``CLIPTextModel``),
                      batch 2 × 77 tokens, fp32
    txt2img-bf16      a whole text-to-image, 512×512, 20 DPM-Solver++(2M) steps, guidance 7.5, bf16 weights:
                      ``ldm.load_pipeline(folder)`` vs ``StableDiffusionPipeline.from_pretrained(folder)``
    turbo-1step       text-to-image with an SD-Turbo-shaped model (SD 2.1-base UNet and OpenCLIP-H encoder) as
                      its card runs it: 1 Euler step on trailing timesteps, no guidance, TAESD decoder, 512×512, fp32
    lcm-4step         4 LCM steps with the SD 1.5 UNet, unguided (an LCM-LoRA's cost), SD VAE, 512×512, fp32
    cifar-train-step  DDPM CIFAR-10 UNet (``UNetConfig.ddpm_cifar10()``, 35.7 M) vs the equal ``UNet2DModel``:
                      forward, ε-MSE loss, backward, AdamW step at batch 32, fp32
    mnist-train       the MNIST recipe's training throughput (``TrainConfig.mnist()``: batch 64, bf16 autocast
                      where the CPU has native bf16) with ldm's ``Trainer`` vs the same step in diffusers' pieces

Reading the table: times are medians (seconds per call, or milliseconds per image for mnist-train);
"ldm / diffusers" < 1 means ldm is faster, on every row. Peaks are the resident memory (CUDA: allocated
memory) of one call with the model built, weights included, each library measured in a process of its
own. The last column, ‖ldm − diffusers‖ / ‖diffusers‖ in float64 on the two outputs, is there so that
speed never hides a correctness regression: fp32 rows agree to ~1e-6, bf16 rows to ~1e-2.

How it measures (``_measure.py``): every row runs in a fresh process that builds both models, warms each up,
then alternates ldm and diffusers calls and keeps each side's median, so load from elsewhere hits both; a
4096² matmul probe (fp32, and bf16 where it is native) before and after the run shows how fast the machine was.
Weights (``_weights.py``): written once by diffusers with ``torch.manual_seed(0)`` into a folder under the
temp directory and loaded by both libraries; both run their defaults, with no speed-up switched on by hand.

``--quick`` (tiny models, one repeat, one thread, all rows in this one process with in-process peaks, a
1024² probe) finishes in well under a minute on 2 cores: it checks that everything runs and agrees, and
asserts no timing. ``--isolate`` gives it the child processes of a full run. Progress goes to stderr, the
report to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _helpers beside this script

from _measure import LIBRARIES, machine_info, matmul_probe, measure_peak, median, relative_difference, time_case
from _rows import ROWS, Setup
from _weights import ensure_weights

# Set before diffusers and transformers are first imported (inside the row builders): their load reports,
# deprecation notes and progress bars are not what is measured and would bury the progress lines.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog="rows: " + ", ".join(ROWS))
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat, one thread, one process: a smoke test")
    parser.add_argument("--json", type=Path, help="also write every row and the machine's details here")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    parser.add_argument("--repeats", type=int, help="timed calls per library and row (default: each row's own)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--isolate", action="store_true",
                        help="with --quick: still one process per row and per (row, library) peak, as full runs do")
    parser.add_argument("--worker", choices=("prepare", "time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in args.rows if r not in ROWS]:
        parser.error(f"unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def quiet_libraries() -> None:
    """diffusers' and transformers' loading bars would bury the progress lines (call where models are built)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- one row -----------------------------------------------------------------------------------
def time_row(name: str, setup: Setup, repeats: int | None, peaks_here: bool) -> dict:
    """Build both sides of a row, time them interleaved and compare their outputs; with ``peaks_here``
    (quick mode) also take each side's peak in this process."""
    row = ROWS[name]
    warmup, repeats = (1, repeats or 1) if setup.quick else (row.warmup, repeats or row.repeats)
    case = row.build(setup)
    timed = time_case(case, warmup, repeats, setup.device)
    result = {
        "row": name, "what": row.what, "unit": case.unit, "scale": case.scale, "items": case.items,
        "warmup": warmup, "repeats": repeats, "notes": case.notes,
        "relative_difference": relative_difference(timed["outputs"]["ldm"], timed["outputs"]["diffusers"]),
    }
    for lib in LIBRARIES:
        seconds = timed["times"][lib]
        result[lib] = {"seconds": seconds, "median_s": median(seconds), "value": median(seconds) * case.scale}
        if case.items > 1:
            result[lib]["items_per_s"] = case.items / median(seconds)
        if peaks_here:
            result[lib]["peak_gib"] = measure_peak(case, lib, setup.device)
    result["ratio"] = result["ldm"]["median_s"] / result["diffusers"]["median_s"]
    result["memory"] = "in the timing process, both libraries resident" if peaks_here else "one process per library"
    return result


def memory_row(name: str, setup: Setup) -> float:
    """Peak memory of one call of one library's side, built alone in this process."""
    (lib,) = setup.libraries
    return measure_peak(ROWS[name].build(setup), lib, setup.device)


def worker(args: argparse.Namespace) -> None:
    """A child process's job; its result is the last line of stdout, as JSON."""
    device = torch.device(args.device)
    if args.library != "ldm":  # an ldm memory process keeps diffusers' modules out of its peak
        quiet_libraries()
    weights = ensure_weights(args.quick)
    if args.worker == "prepare":
        out: object = str(weights)
    elif args.worker == "time":
        out = time_row(args.rows[0], Setup(args.quick, device, weights), args.repeats, peaks_here=False)
    else:
        out = memory_row(args.rows[0], Setup(args.quick, device, weights, libraries=(args.library,)))
    print(json.dumps(out))


def in_child(args: argparse.Namespace, job: str, row: str | None = None, library: str | None = None):
    """Run one job in a fresh Python process (same interpreter and options) and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--device", args.device]
    cmd += ["--quick"] * args.quick + (["--rows", row] if row else []) + (["--library", library] if library else [])
    cmd += ["--repeats", str(args.repeats)] if args.repeats else []
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # its stderr passes through
    if done.returncode:
        raise RuntimeError(f"{job} {row or ''} {library or ''} exited with status {done.returncode} (see its stderr above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_row(args: argparse.Namespace, name: str, weights: Path, isolate: bool) -> dict:
    """A row's timing and its two peaks: in child processes for real runs, here for --quick."""
    if not isolate:
        return time_row(name, Setup(args.quick, torch.device(args.device), weights), args.repeats, peaks_here=True)
    result = in_child(args, "time", name)
    for lib in LIBRARIES:
        result[lib]["peak_gib"] = in_child(args, "memory", name, lib)
    return result


# --- the report ----------------------------------------------------------------------------------
def header(info: dict, probe: dict) -> str:
    lines = [f"CPU: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), torch threads "
             f"{info['torch_threads']}, capability {info['cpu_capability']}, native bf16 {info.get('cpu_bf16', '?')}",
             f"python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}, transformers "
             f"{info['transformers']}, ldm {info['ldm']}; device {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else ""),
             f"load average {info.get('load_average', '?')}", probe_line("before", probe)]
    return "\n".join(lines)


def probe_line(when: str, probe: dict) -> str:
    bf16 = "not native, not probed" if probe["bf16_gflops"] is None else f"{probe['bf16_gflops']:.0f} GFLOP/s"
    return f"matmul probe {when} the run ({probe['size']}²): fp32 {probe['fp32_gflops']:.0f} GFLOP/s, bf16 {bf16}"


def table(results: list[dict]) -> str:
    lines = ["| row | unit | ldm | diffusers | ldm / diffusers | ldm peak GiB | diffusers peak GiB | ‖ldm−diffusers‖/‖diffusers‖ | repeats |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} |" + " |" * 7)
            continue
        a, b = r["ldm"], r["diffusers"]
        lines.append(f"| {r['row']} | {r['unit']} | {a['value']:.3g} | {b['value']:.3g} | {r['ratio']:.2f} | "
                     f"{a['peak_gib']:.2f} | {b['peak_gib']:.2f} | {r['relative_difference']:.1e} | {r['repeats']} |")
    return "\n".join(lines)


def footnotes(results: list[dict], in_process: bool) -> list[str]:
    notes = ["ldm / diffusers < 1: ldm faster. Times are medians of interleaved calls after warm-up."]
    notes.append("Peaks: measured in the timing process with both libraries resident (--quick), not comparable."
                 if in_process else "Peaks: one process per library, model built, peak over one call: the whole resident "
                 "set, so weights, the interpreter, torch and the library's own modules all count.")
    for r in results:
        notes += r.get("notes", [])
        if "error" not in r and "items_per_s" in r["ldm"]:
            notes.append(f"{r['row']}: ldm {r['ldm']['items_per_s']:.0f} images/s, diffusers "
                         f"{r['diffusers']['items_per_s']:.0f} images/s")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        # Tiny models gain nothing from a second thread, and on a busy machine threads that wait for each
        # other after every op make a smoke test several times slower.
        torch.set_num_threads(1)
    if args.worker:
        worker(args)
        return 0
    start = time.perf_counter()
    device = torch.device(args.device)
    probe_size = 1024 if args.quick else 4096
    info, before = machine_info(device), matmul_probe(probe_size, device)
    print(header(info, before), flush=True)
    log(f"weights: the {'quick' if args.quick else 'full-size'} random models (written on the first run, then reused)")
    isolate = args.isolate or not args.quick
    if not isolate:
        quiet_libraries()
    # Full-size weights take gigabytes while they are written: a child process gives them back when it ends.
    weights = Path(in_child(args, "prepare")) if isolate else ensure_weights(args.quick)
    log(f"weights folder: {weights}")
    results = []
    for i, name in enumerate(args.rows, 1):
        row_start = time.perf_counter()
        try:
            r = run_row(args, name, weights, isolate)
            log(f"[{i}/{len(args.rows)}] {name}: ldm {r['ldm']['value']:.3g} {r['unit']}, diffusers "
                f"{r['diffusers']['value']:.3g}, ratio {r['ratio']:.2f}, rel. difference {r['relative_difference']:.1e} "
                f"({time.perf_counter() - row_start:.0f} s)")
        except Exception as e:  # one broken row should not hide the others' numbers
            traceback.print_exc()
            r = {"row": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
            log(f"[{i}/{len(args.rows)}] {name}: FAILED ({r['error']})")
        results.append(r)
    after = matmul_probe(probe_size, device)
    print(probe_line("after", after))
    print()
    print(table(results))
    print()
    print("\n".join(f"- {n}" for n in footnotes(results, in_process=not isolate)))
    wall = time.perf_counter() - start
    print(f"\n{'quick' if args.quick else 'full'} run: {wall:.0f} s")
    if args.json:
        report = {"command": sys.argv, "mode": "quick" if args.quick else "full", "machine": info, "probe_before": before,
                  "probe_after": after, "weights": str(weights), "wall_s": wall, "rows": results}
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
