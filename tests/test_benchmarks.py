"""The benchmark suite runs: ``benchmarks/run.py --quick`` times every row on both libraries, on tiny models of
the same families, and the two libraries' outputs agree. No timing is asserted (the machine may be busy)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.reference

RUN = Path(__file__).parent.parent / "benchmarks" / "run.py"
FP32_ROWS = ("unet-fp32", "vae-decode", "text-encoder", "cifar-train-step", "turbo-1step", "lcm-4step")
BF16_ROWS = ("unet-bf16", "txt2img-bf16", "mnist-train")  # mnist-train: bf16 autocast where the CPU has it


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(the JSON report, stdout) of one quick run."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run([sys.executable, str(RUN), "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"run.py --quick failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return json.loads(out.read_text()), done.stdout


def test_every_row_has_times_ratio_and_peaks(quick_run):
    report, _ = quick_run
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == set(FP32_ROWS + BF16_ROWS)
    for name, r in rows.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        for lib in ("ldm", "diffusers"):
            assert r[lib]["seconds"] and all(s > 0 for s in r[lib]["seconds"]), (name, lib)
            assert math.isfinite(r[lib]["peak_gib"]) and r[lib]["peak_gib"] > 0, (name, lib)
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, name
        assert math.isfinite(r["relative_difference"]), name
    assert report["machine"]["torch_threads"] >= 1 and report["probe_before"]["fp32_gflops"] > 0


def test_outputs_agree(quick_run):
    """A real correctness check: the same weights give the same numbers in fp32, and close ones in bf16."""
    rows = {r["row"]: r for r in quick_run[0]["rows"]}
    for name in FP32_ROWS:
        assert rows[name]["relative_difference"] < 1e-4, (name, rows[name]["relative_difference"])
    for name in BF16_ROWS:
        assert rows[name]["relative_difference"] < 5e-2, (name, rows[name]["relative_difference"])


def test_the_report_is_a_markdown_table_after_the_machine_details(quick_run):
    report, stdout = quick_run
    assert stdout.index("matmul probe before") < stdout.index("| row | unit | ldm | diffusers | ldm / diffusers |")
    for r in report["rows"]:
        assert f"| {r['row']} |" in stdout
    assert "matmul probe after" in stdout


def test_unknown_rows_are_refused_by_name():
    done = subprocess.run([sys.executable, str(RUN), "--rows", "unet-fp32,unet-fp64"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "unknown rows unet-fp64" in done.stderr
