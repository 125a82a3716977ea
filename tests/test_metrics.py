"""Tests for ldm.metrics: the Fréchet distance's closed forms, the digit classifier, the trained one shipped in
the package (what it scores, how it was made, that loading it never trains or writes), and that the report
separates real digits from noise."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ldm import metrics
from ldm.checkpoint import CheckpointError, load_weight_file
from ldm.data import load_dataset
from ldm.metrics import (
    CLASSIFIER_FILE,
    CLASSIFIER_VERSION,
    DigitClassifier,
    DigitReport,
    evaluate_digits,
    frechet_distance,
    load_classifier,
    load_samples_npy,
    non_digits,
    random_shift,
    split_indices,
    train_classifier,
)

ROOT = Path(__file__).resolve().parent.parent
SHORT_STEPS = 100  # ~91 % held-out accuracy in about ten seconds; the default 1500 steps reach ~99 %


@pytest.fixture(scope="module")
def trained() -> tuple[DigitClassifier, float]:
    # One thread: these small batches gain little from a second, and when another job shares
    # the cores, two spinning threads slow training down thirty-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_classifier(steps=SHORT_STEPS, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped() -> DigitClassifier:
    return load_classifier()


@pytest.fixture(scope="module")
def shipped_metadata() -> dict[str, str]:
    """The safetensors header metadata of the shipped classifier: how scripts/train_classifier.py made it."""
    return load_weight_file(CLASSIFIER_FILE)[1]


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """1000 real digits the classifier never trained on, in [-1, 1], and their labels."""
    return load_dataset("mnist-bundled").batch(split_indices()[1])


def random_covariance(D: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(D, D, generator=generator, dtype=torch.float64)
    return a @ a.T / D + 0.1 * torch.eye(D, dtype=torch.float64)


# --- Fréchet distance -------------------------------------------------------------------------


def test_frechet_distance_of_identical_stats_is_zero():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(16, generator=g, dtype=torch.float64), random_covariance(16, g)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_diagonal_closed_form():
    # Commuting covariances: Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σᵢ (√aᵢ − √bᵢ)².
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 4.0, 8), rng.uniform(0.1, 4.0, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariances_match_eigenvalues_of_the_product():
    # Independent route: Σ1Σ2 has real positive eigenvalues λᵢ, and Tr (Σ1Σ2)^½ = Σᵢ √λᵢ.
    g = torch.Generator().manual_seed(1)
    s1, s2 = random_covariance(12, g).numpy(), random_covariance(12, g).numpy()
    mu1, mu2 = np.zeros(12), np.full(12, 0.5)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = 12 * 0.25 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_and_grows_with_the_mean_shift():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(10, generator=g, dtype=torch.float64)
    s1, s2 = random_covariance(10, g), random_covariance(10, g)
    assert frechet_distance(mu, s1, mu + 1, s2) == pytest.approx(frechet_distance(mu + 1, s2, mu, s1), rel=1e-9)
    # Same covariance: the distance is exactly ‖Δμ‖².
    shift = torch.zeros(10, dtype=torch.float64)
    shift[3] = 2.0
    assert frechet_distance(mu, s1, mu + shift, s1) == pytest.approx(4.0, rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mu .* sigma"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- classifier -------------------------------------------------------------------------------


def test_classifier_shapes():
    model = DigitClassifier().eval()
    x = torch.zeros(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, DigitClassifier.feature_dim)


def test_split_is_fixed_and_disjoint():
    train, held = split_indices(1000)
    assert len(held) == 1000 and len(train) == 9000
    assert len(set(train.tolist()) | set(held.tolist())) == 10_000
    assert torch.equal(held, split_indices(1000)[1])
    with pytest.raises(ValueError, match="holdout"):
        split_indices(0)


def test_random_shift_translates_within_two_pixels():
    x = torch.full((200, 1, 28, 28), -1.0)
    x[:, 0, 14, 14] = 1.0  # one bright pixel per image; find where it went
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert (shifted == 1.0).sum(dim=(1, 2, 3)).eq(1).all()  # moved, not duplicated or lost
    assert (shifted == -1.0).sum() == x.numel() - 200       # everything else is background
    rows, cols = (shifted[:, 0] == 1.0).nonzero()[:, 1:].T
    offsets = set(zip((rows - 14).tolist(), (cols - 14).tolist()))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25, no others


def test_non_digits_are_in_range_and_none_is_a_digit():
    x, _ = load_dataset("mnist-bundled").batch(torch.arange(500))
    out = non_digits(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    flat = out.flatten(1).std(1) == 0
    # A shuffled digit keeps its own pixel values: sorted, they equal the sorted pixels of its source.
    same_ink = (out.flatten(1).sort(1).values == x.flatten(1).sort(1).values).all(1)
    assert 50 < flat.sum() < 150 and 50 < same_ink.sum() < 150  # each about one in five
    assert not any(torch.equal(o, d) for o, d in zip(out, x))  # no digit passes through unchanged


def test_short_training_beats_chance_by_far(trained):
    model, accuracy = trained
    assert not model.training
    assert accuracy > 0.85  # chance is 0.1


# --- evaluation -------------------------------------------------------------------------------


def test_real_digits_score_well_and_noise_badly(shipped, held_out):
    model = shipped
    x, y = held_out
    g = torch.Generator().manual_seed(0)
    real = evaluate_digits(x, y, classifier=model)
    uniform = evaluate_digits(torch.rand(1000, 1, 28, 28, generator=g) * 2 - 1, classifier=model)
    gaussian = evaluate_digits(torch.randn(1000, 1, 28, 28, generator=g).clamp(-1, 1), classifier=model)
    black = evaluate_digits(torch.full((1000, 1, 28, 28), -1.0), classifier=model)

    assert real.n == 1000 and sum(real.class_counts) == 1000 and sum(uniform.class_counts) == 1000
    assert real.confident_share > 0.75 and real.class_entropy > 0.98
    assert real.label_accuracy is not None and real.label_accuracy > 0.9
    assert uniform.label_accuracy is None
    for fake in (uniform, gaussian, black):
        assert fake.frechet_distance > 10 * real.frechet_distance
        # Outlier exposure: what is no digit is read with doubt, not as some digit with certainty.
        assert fake.confident_share < 0.1 and fake.mean_confidence < 0.5
    assert max(black.class_counts) == 1000 and black.class_entropy == pytest.approx(0.0)


def test_the_frechet_reference_can_be_the_training_data(shipped, held_out):
    x, y = held_out
    moved = torch.roll(x, 4, dims=3)  # digits moved 4 px right: what a model trained on moved digits should draw
    to_real = evaluate_digits(moved, classifier=shipped).frechet_distance
    to_moved = evaluate_digits(moved, classifier=shipped, reference=torch.roll(x.flip(0), 4, dims=3)).frechet_distance
    assert to_moved < to_real / 10, (to_moved, to_real)
    with pytest.raises(ValueError, match=r"reference must be a float tensor \(M, 1, 28, 28\)"):
        evaluate_digits(x, classifier=shipped, reference=x[:, :, :14])


def test_shuffled_labels_score_chance(shipped, held_out):
    x, y = held_out
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    report = evaluate_digits(x, shuffled, classifier=shipped)
    assert 0.05 < report.label_accuracy < 0.15


def test_class_entropy_and_counts_follow_the_predictions(shipped, held_out):
    # Only ones and sevens: two classes, each about half → entropy ≈ log 2 / log 10.
    x, y = held_out
    x = x[(y == 1) | (y == 7)]
    report = evaluate_digits(x, classifier=shipped)
    counts = np.array(report.class_counts)
    assert counts.sum() == report.n == len(x)
    assert counts[[1, 7]].sum() > 0.95 * len(x)
    p = counts[counts > 0] / len(x)
    assert report.class_entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(10))
    assert report.class_entropy < 0.35


def test_summary_mentions_label_accuracy_only_when_measured():
    report = DigitReport(n=4, confident_share=0.5, mean_confidence=0.7, class_counts=(4,) + (0,) * 9,
                         class_entropy=0.0, frechet_distance=12.5, label_accuracy=None, threshold=0.9)
    assert "12.50" in report.summary() and "label accuracy" not in report.summary()
    with_labels = dataclasses.replace(report, label_accuracy=0.25)
    assert "label accuracy" in with_labels.summary() and "25.0%" in with_labels.summary()


@pytest.mark.parametrize(
    "samples, message",
    [
        (torch.zeros(10, 28, 28), r"\(N, 1, 28, 28\)"),
        (torch.zeros(10, 3, 28, 28), r"\(N, 1, 28, 28\)"),
        (torch.zeros(1, 1, 28, 28), "N ≥ 2"),
        (torch.full((10, 1, 28, 28), 255.0), r"\[-1, 1\]"),
    ],
)
def test_evaluate_digits_rejects_bad_samples(samples, message):
    with pytest.raises(ValueError, match=message):
        evaluate_digits(samples, classifier=DigitClassifier())


def test_evaluate_digits_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        evaluate_digits(torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 10]), classifier=DigitClassifier())


# --- the shipped classifier -------------------------------------------------------------------


def script_recipe() -> dict[str, int]:
    spec = importlib.util.spec_from_file_location("train_classifier", ROOT / "scripts" / "train_classifier.py")
    spec.loader.exec_module(script := importlib.util.module_from_spec(spec))
    return script.RECIPE


def test_shipped_classifier_is_the_trained_one(shipped, shipped_metadata, held_out):
    # Scored now, on the digits it never trained on: as accurate as its header says (up to two of the
    # 1000 digits read differently by another CPU's arithmetic), so the file really is the trained classifier.
    recorded = float(shipped_metadata["heldout_accuracy"])
    assert evaluate_digits(*held_out, classifier=shipped).label_accuracy >= recorded - 0.002
    assert recorded > 0.98
    recipe = script_recipe()
    assert {k: int(shipped_metadata[k]) for k in recipe} == recipe
    assert int(shipped_metadata["classifier_version"]) == CLASSIFIER_VERSION
    assert not shipped.training
    assert CLASSIFIER_FILE.stat().st_size < 1_000_000


@pytest.mark.slow
def test_retraining_with_the_recorded_recipe_reaches_the_shipped_accuracy(shipped_metadata):
    recipe = {k: int(shipped_metadata[k]) for k in script_recipe()}
    _, accuracy = train_classifier(**recipe, progress=False)
    assert accuracy == pytest.approx(float(shipped_metadata["heldout_accuracy"]), abs=0.005)


def test_load_classifier_neither_trains_nor_writes(tmp_path, monkeypatch, held_out):
    for name in ("HOME", "LDM_CACHE"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))

    def no_training(**kwargs):
        raise AssertionError("load_classifier trained a classifier")

    monkeypatch.setattr(metrics, "train_classifier", no_training)
    report = evaluate_digits(held_out[0][:100])  # the default classifier: load_classifier()
    assert report.n == 100
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["HOME", "LDM_CACHE"]


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(CLASSIFIER_FILE.read_bytes()[:5000])


def corrupt_other_model(path: Path) -> None:
    path.write_bytes(safetensors.torch.save({"weight": torch.zeros(3)}))


@pytest.mark.parametrize("corrupt", [None, corrupt_truncated, corrupt_other_model], ids=["missing", "truncated", "other"])
def test_a_missing_or_corrupt_shipped_file_says_what_to_do(tmp_path, monkeypatch, corrupt):
    path = tmp_path / CLASSIFIER_FILE.name
    if corrupt:
        corrupt(path)
    monkeypatch.setattr(metrics, "CLASSIFIER_FILE", path)
    with pytest.raises(CheckpointError, match="reinstall ldm, or recreate it with `python scripts/train_classifier.py`") as e:
        load_classifier()
    assert str(path) in str(e.value)


def test_cli_evaluate_scores_an_npy_with_the_shipped_classifier(tmp_path, held_out):
    # A fresh user: empty home and cache. The report comes from the shipped weights, identical run to run.
    np.save(tmp_path / "digits.npy", ((held_out[0][:100] + 1) / 2).numpy())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("HOME", "LDM_CACHE"):
        (tmp_path / name).mkdir()
        env[name] = str(tmp_path / name)
    command = [sys.executable, "-m", "ldm.cli", "evaluate", str(tmp_path / "digits.npy"), "--n", "100"]
    outputs = []
    for _ in range(2):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        outputs.append(done.stdout)
    assert "of 100" in outputs[0] and "Fréchet distance" in outputs[0] and "class entropy" in outputs[0]
    assert "training" not in outputs[0] + done.stderr
    assert outputs[0] == outputs[1]
    assert not any((tmp_path / "HOME").iterdir()) and not any((tmp_path / "LDM_CACHE").iterdir())


# --- .npy samples -----------------------------------------------------------------------------


def test_load_samples_npy_maps_unit_range_to_model_range(tmp_path):
    u = np.linspace(0, 1, 2 * 28 * 28, dtype=np.float32).reshape(2, 1, 28, 28)
    np.save(tmp_path / "s.npy", u)
    x = load_samples_npy(tmp_path / "s.npy")
    assert x.dtype == torch.float32 and x.shape == (2, 1, 28, 28)
    assert torch.allclose(x, torch.from_numpy(u) * 2 - 1)
    assert x.min() == -1 and x.max() == 1


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 28, 28), np.float32), r"shape \(N, 1, H, W\)"),
        (np.zeros((4, 3, 28, 28), np.float32), r"shape \(N, 1, H, W\)"),  # colour: not digits
        (np.zeros((4, 1, 28, 28), np.uint8), "divide by 255"),
        (np.full((4, 1, 28, 28), -0.5, np.float32), r"\(x \+ 1\) / 2"),
        (np.full((4, 1, 28, 28), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((4, 1, 28, 28), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_load_samples_npy_rejects_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=message):
        load_samples_npy(tmp_path / "bad.npy")
