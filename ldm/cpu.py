"""What this CPU does fast, and the training precision that follows from it.

bf16 autocast pays only where the CPU multiplies bf16 in hardware (AVX512-BF16, AMX): elsewhere PyTorch emulates it
(a bf16 matmul measured 0.9 GFLOP/s against 75 in fp32 on an AVX2-only CPU), so ``mixed_precision="auto"`` trains in
fp32 there. ``describe`` says what was found and chosen, and why, in one line that ``ldm train`` prints at start.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

# /proc/cpuinfo flag → the name people know it by
FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo); empty where they cannot be read."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def native_bf16() -> bool:
    """Whether oneDNN multiplies bf16 in hardware on this CPU (what PyTorch itself checks)."""
    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def features() -> str:
    """What this CPU has and what torch uses of it, e.g. "AVX2 yes, AVX-512 no, AVX512-BF16 no, AMX no; kernels AVX2"
    (the kernels torch dispatches to, lower than the flags where ATEN_CPU_CAPABILITY caps them)."""
    flags = cpu_flags()
    found = ", ".join(f"{label} {'yes' if flag in flags else 'no'}" for flag, label in FEATURES.items())
    kernels = f"kernels {torch.backends.cpu.get_cpu_capability()}"
    return f"{found}; {kernels}" if flags else kernels


def summary() -> str:
    """One line for benchmark output: model, features, native bf16, threads, torch version."""
    return (f"{cpu_model()}: {features()}; bf16 {'native' if native_bf16() else 'emulated'}; "
            f"{torch.get_num_threads()} threads; torch {torch.__version__}")


def describe(device: torch.device, asked: str, chosen: str) -> str:
    """One line: the device's features, the precision chosen for ``mixed_precision=asked``, and why."""
    if device.type != "cpu":
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return f"device {name}: precision {chosen} ({'auto: the GPU’s fastest' if asked == 'auto' else 'as asked'})"
    if asked != "auto":
        why = "as asked" + ("; bf16 is emulated on this CPU, far slower than fp32" if chosen == "bf16" and
                            not native_bf16() else "")
    elif chosen == "bf16":
        why = "auto: bf16 is native on this CPU"
    else:
        why = "auto: bf16 is not native on this CPU, so fp32"
    precision = "fp32" if chosen == "no" else f"{chosen} autocast"
    return f"CPU: {features()}; {torch.get_num_threads()} threads; precision {precision} ({why})"
