"""How the suite measures: interleaved timing, peak memory, output agreement, and the machine's state.

On a 2-core CPU shared with other work, a number taken alone means little: the two libraries are timed
in the same process, alternately (ldm, diffusers, ldm, diffusers, …), and the median of each side is
kept, so a burst of load hits both; a large-matmul probe before and after the run shows how fast the
machine was at all.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ldm import cpu

LIBRARIES = ("ldm", "diffusers")


@dataclass
class Side:
    """One library's half of a row.

    ``run`` is the unit that is timed and returns its output; ``short`` is a cheaper call with the same
    peak memory (txt2img with 2 steps), used to warm up and to measure memory; ``probe`` gives the output
    to compare when ``run``'s is not comparable (training steps: the forward output on fixed inputs)."""

    run: Callable[[], Any]
    short: Callable[[], Any] | None = None
    probe: Callable[[], Any] | None = None


@dataclass
class Case:
    """A row, built: its sides and how to time them. ``items`` is what one run processes (images for a
    throughput row), so times can be reported per item."""

    sides: dict[str, Side]
    unit: str = "s"
    scale: float = 1.0  # seconds per run → the unit shown
    items: int = 1
    inference: bool = True
    notes: list[str] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grad_mode(case: Case):
    """Inference rows run under inference_mode, as users should; training rows need autograd."""
    return torch.inference_mode() if case.inference else contextlib.nullcontext()


def time_case(case: Case, warmup: int, repeats: int, device: torch.device) -> dict:
    """Take the probes' outputs, warm each side up, then time ``repeats`` runs per side, interleaved.

    Returns seconds per run for each timed call, and each side's output (the first timed run's, or the probe's)."""
    outputs: dict[str, Any] = {}
    with grad_mode(case):
        for lib, side in case.sides.items():  # before any training step: Adam moves both sides' weights apart
            if side.probe is not None:
                outputs[lib] = side.probe()
        for lib, side in case.sides.items():
            for _ in range(warmup):
                (side.short or side.run)()
        times: dict[str, list[float]] = {lib: [] for lib in case.sides}
        for i in range(repeats):
            for lib, side in case.sides.items():
                synchronize(device)
                start = time.perf_counter()
                out = side.run()
                synchronize(device)
                times[lib].append(time.perf_counter() - start)
                if i == 0 and side.probe is None:
                    outputs[lib] = out
    return {"times": times, "outputs": outputs}


# --- peak memory ------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    """Make the peak start again from what is resident now (weights included)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def peak_gib(device: torch.device) -> float:
    """Peak resident set (CPU, Linux VmHWM) or peak allocated CUDA memory since ``reset_peak``, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure_peak(case: Case, lib: str, device: torch.device) -> float:
    """Peak memory of one call of ``lib``'s side, the model already built."""
    side = case.sides[lib]
    with grad_mode(case):
        reset_peak(device)
        (side.short or side.run)()
        synchronize(device)
        return peak_gib(device)


# --- agreement ---------------------------------------------------------------------------------
def as_tensor(x: Any) -> torch.Tensor:
    """Tensors, PIL images (their uint8 pixels) and numbers → a float64 CPU tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    if isinstance(x, Image.Image):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    return torch.as_tensor(x, dtype=torch.float64)


def relative_difference(ours: Any, reference: Any) -> float:
    """‖a − b‖ / ‖b‖ in float64, b the reference (diffusers / transformers)."""
    a, b = as_tensor(ours), as_tensor(reference)
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: ldm {tuple(a.shape)}, diffusers {tuple(b.shape)}")
    return ((a - b).norm() / b.norm()).item()


# --- the machine ---------------------------------------------------------------------------------
def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# Capping every kernel library at AVX2 makes an AVX-512 CPU run the code an AVX2-only one runs (bf16 is then no
# longer native): torch's own kernels, oneDNN's convolutions, MKL's matmuls. The clock and caches stay this machine's.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cap_at_avx2() -> None:
    """Re-run this script with the kernels capped at AVX2 (the caps are read when torch loads, so in a new process)."""
    if os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu.cpu_model(), "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": _version("diffusers"),
        "transformers": _version("transformers"), "ldm": _version("ldm-diffusion"), "device": str(device),
    }
    if device.type == "cpu":
        info["cpu_bf16"] = native_bf16(device)
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware (a CPU without it emulates bf16 at a few GFLOP/s)."""
    return device.type == "cuda" or cpu.native_bf16()


def matmul_probe(n: int, device: torch.device, repeats: int = 3) -> dict[str, float | None]:
    """GFLOP/s of an n×n @ n×n matmul in fp32 and bf16 (best of ``repeats`` after one warm-up): the
    machine's speed right now, so a slow run on a busy machine can be told from a slow library. bf16 is
    probed only where it is native: emulated, one 4096² product takes minutes (its value is then None)."""
    out: dict[str, float | None] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not native_bf16(device):
            out[f"{name}_gflops"] = None
            continue
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for i in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            if i:
                best = min(best, time.perf_counter() - start)
        out[f"{name}_gflops"] = 2 * n**3 / best / 1e9
    return out | {"size": n}


def median(xs: list[float]) -> float:
    return statistics.median(xs)
