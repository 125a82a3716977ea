"""Train the digit classifier that `ldm evaluate` scores samples with, and write it into the package.

    python scripts/train_classifier.py        # about two minutes on 2 CPU cores

The weights go to ldm/assets/metrics/digit_classifier_v{CLASSIFIER_VERSION}.safetensors (`ldm.metrics.CLASSIFIER_FILE`),
with the recipe and the held-out accuracy in the safetensors header, so the shipped file says how it was made and
tests/test_metrics.py can check it against both a fresh evaluation and a retraining. Scores from different
classifiers are not comparable: rerun this (and bump CLASSIFIER_VERSION) only when the architecture or the recipe
changes, then update ldm/assets/metrics/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ldm, so the file lands in it

from ldm.checkpoint import atomic_write  # noqa: E402
from ldm.metrics import CLASSIFIER_FILE, CLASSIFIER_VERSION, load_classifier, train_classifier  # noqa: E402

# train_classifier's defaults, written out so that the header records them and a changed default changes nothing here.
RECIPE = {"steps": 1500, "batch_size": 128, "seed": 0, "holdout": 1000}


def main() -> None:
    model, accuracy = train_classifier(**RECIPE)
    metadata = {"format": "pt", "classifier_version": str(CLASSIFIER_VERSION), "heldout_accuracy": repr(accuracy),
                **{k: str(v) for k, v in RECIPE.items()}, "torch_version": torch.__version__}
    blob = safetensors.torch.save(model.state_dict(), metadata=metadata)
    atomic_write(CLASSIFIER_FILE, lambda f: f.write(blob))  # never half a file, even if killed while writing
    load_classifier()  # reads back through the path `ldm evaluate` takes
    print(f"held-out accuracy {accuracy:.2%} ({RECIPE['holdout']} digits); "
          f"wrote {CLASSIFIER_FILE} ({CLASSIFIER_FILE.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
