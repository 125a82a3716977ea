"""Regenerate the notebooks' key figures for docs/notebooks.md: run every notebook at its default settings
with LDM_FIGURES=docs/images/notebooks. Outputs are not written back (notebooks are stored without them).

    python docs/make_figures.py [--quick] [NAME ...]      # e.g. 01_forward_process

Needs the [notebooks] extra. About 15 minutes on 2 CPU cores; an idle machine keeps each notebook's time budget.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook stems to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="reduced settings, as CI runs them")
    args = parser.parse_args()
    out = ROOT / "docs" / "images" / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(LDM_FIGURES=str(out), MPLBACKEND="Agg", **({"LDM_QUICK": "1"} if args.quick else {}))
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if args.names and path.stem not in args.names:
            continue
        start = time.perf_counter()
        notebook = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        print(f"{path.name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
