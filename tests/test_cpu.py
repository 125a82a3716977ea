"""The CPU line ``ldm train`` prints: features found, precision chosen, and why — on any CPU, by faking its flags."""

import pytest
import torch

from ldm import cpu
from ldm.loop import resolve_precision

AVX2_ONLY = {"avx2", "fma", "sse4_2"}
ZEN4 = AVX2_ONLY | {"avx512f", "avx512_bf16"}


@pytest.mark.parametrize("flags, native, asked, expected", [
    (AVX2_ONLY, False, "auto", "AVX2 yes, AVX-512 no, AVX512-BF16 no, AMX no; kernels AVX2; 2 threads; precision "
                               "fp32 (auto: bf16 is not native on this CPU, so fp32)"),
    (ZEN4, True, "auto", "AVX-512 yes, AVX512-BF16 yes, AMX no; kernels AVX512; 2 threads; precision bf16 autocast "
                         "(auto: bf16 is native on this CPU)"),
    (AVX2_ONLY, False, "bf16", "precision bf16 autocast (as asked; bf16 is emulated on this CPU, far slower than fp32)"),
    (ZEN4, True, "no", "precision fp32 (as asked)"),
])
def test_the_line_says_what_was_found_chosen_and_why(flags, native, asked, expected, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    monkeypatch.setattr("ldm.loop.native_bf16", lambda: native)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if "avx512f" in flags else "AVX2")
    chosen = resolve_precision(asked, torch.device("cpu"))
    assert chosen == {"auto": "bf16" if native else "no"}.get(asked, asked)
    assert expected in cpu.describe(torch.device("cpu"), asked, chosen)


def test_unreadable_flags_fall_back_to_torchs_capability(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", set)
    assert f"kernels {torch.backends.cpu.get_cpu_capability()}" in cpu.describe(torch.device("cpu"), "no", "no")


def test_ldm_train_prints_it_first(tmp_path, capsys):
    from ldm.cli import main
    from test_cli import TINY

    main(["train", "--preset", "mnist", "--out", str(tmp_path / "run"), "--steps", "1", *TINY])
    preset, features = capsys.readouterr().out.splitlines()[:2]
    assert preset.startswith("preset mnist: UNet 16 channels × 1,2 (") and "batch 16" in preset  # TINY's options
    assert "only the precision follows it" in preset
    assert features.startswith("CPU: ")
