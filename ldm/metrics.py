"""Sample quality of generated MNIST digits, judged by a small classifier trained on real MNIST.

The classifier's weights ship with the package (`CLASSIFIER_FILE`, made by scripts/train_classifier.py), so
every install scores samples with the same classifier and `ldm evaluate` never trains one first.

    from ldm.metrics import evaluate_digits
    report = evaluate_digits(samples, labels)   # samples in [-1, 1], (N, 1, 28, 28)
    print(report.summary())

Four numbers, each answering one question:
  - confident share: does the classifier recognise a digit at all (max softmax ≥ threshold)?
  - class entropy: are all ten digits generated, evenly (1.0), or only a few (→ 0)?
  - Fréchet distance: do the samples' features match real digits' in mean and covariance? FID
    [Heusel et al. 2017] with this classifier's penultimate features in place of Inception's: comparable
    only with itself, at equal sample counts (the estimate is biased upward for small N).
  - label accuracy: for class-conditional models, is a sample asked to be digit k read as k?
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_weight_file, load_weights
from .data import load_dataset

NUM_CLASSES = 10
CLASSIFIER_VERSION = 1  # in the shipped file's name: bump it when the architecture or recipe changes
CLASSIFIER_FILE = Path(__file__).parent / "assets" / "metrics" / f"digit_classifier_v{CLASSIFIER_VERSION}.safetensors"
_SPLIT_SEED = 1234  # fixed, so every classifier (whatever its training seed) holds out the same digits
ArrayLike = np.ndarray | torch.Tensor


class DigitClassifier(nn.Module):
    """Three strided convolutions and two linear layers, about 0.19 M parameters.
    Shapes: x (B, 1, 28, 28) in [-1, 1] → features (B, 128) → logits (B, 10).
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        # Strided convolutions rather than max-pooling: training steps ~2.5× faster on a CPU.
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # (B, 64, 7, 7)
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # (B, 64, 4, 4)
            nn.Flatten(), nn.Dropout(0.25),                        # (B, 1024)
        )
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, the space the Fréchet distance is measured in."""
        return F.relu(self.fc(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def split_indices(holdout: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices into the bundled MNIST digits: a fixed permutation, the last `holdout` held out."""
    n = len(load_dataset("mnist-bundled"))
    if not 0 < holdout < n:
        raise ValueError(f"holdout must be between 1 and {n - 1} digits, got {holdout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    return perm[:-holdout], perm[-holdout:]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own (dy, dx) ∈ [−max_shift, max_shift]², filling with background (−1):
    generated digits are rarely centred as precisely as MNIST's. Shapes: x (B, 1, H, W) → (B, 1, H, W).
    """
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B, 1), generator=generator)
    rows = (dy + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1)


def non_digits(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images that are no digit, one kind each: uniform or Gaussian noise, a flat grey, smooth blobs,
    or the pixels of a digit in `x` shuffled (same ink, no shape). Trained towards the uniform
    distribution, they teach the classifier doubt: without them it reads noise as an 8 with 99.9 %
    confidence. Shapes: x (B, 1, H, W) in [-1, 1] → (B, 1, H, W) in [-1, 1].
    """
    B, _, H, W = x.shape
    coarse = torch.randn(B, 1, H // 4, W // 4, generator=generator)
    candidates = torch.stack([
        torch.rand(x.shape, generator=generator) * 2 - 1,
        torch.randn(x.shape, generator=generator).clamp(-1, 1),
        (torch.rand(B, 1, 1, 1, generator=generator) * 2 - 1).expand_as(x),
        (2 * F.interpolate(coarse, (H, W), mode="bilinear")).clamp(-1, 1),
        x.flatten(1)[:, torch.randperm(H * W, generator=generator)].view_as(x),
    ])  # (5, B, 1, H, W)
    return candidates[torch.randint(len(candidates), (B,), generator=generator), torch.arange(B)]


def train_classifier(
    *, steps: int = 1500, batch_size: int = 128, seed: int = 0, holdout: int = 1000, progress: bool = True
) -> tuple[DigitClassifier, float]:
    """Train a `DigitClassifier` on the bundled MNIST digits minus `holdout` (see `split_indices`);
    return it in eval mode with its held-out accuracy. Adam, cosine-decayed learning rate, ±2 px shifts.

    Outlier exposure [Hendrycks et al. 2019]: each batch also holds batch_size/4 `non_digits` x′, and
        L = CE(f(x), y) + ½ · (−mean_k log p_k(x′))      (the second term: cross-entropy to uniform)
    Initialisation, batches, shifts and dropout all come from `seed`; the global RNG is left as it was.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    data = load_dataset("mnist-bundled")
    train_idx, held_idx = split_indices(holdout)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # for the initial weights and dropout masks
        model = DigitClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        bar = tqdm(range(steps), desc="training digit classifier", disable=not progress)
        for _ in bar:
            x, y = data.batch(train_idx[torch.randint(len(train_idx), (batch_size,), generator=generator)])
            x = torch.cat([x, non_digits(x[: batch_size // 4], generator)])
            logits = model(random_shift(x, 2, generator))
            loss = F.cross_entropy(logits[:batch_size], y) - 0.5 * logits[batch_size:].log_softmax(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    x_held, y_held = data.batch(held_idx)
    predicted = _features(model.eval(), x_held, batch_size=1000)[1].argmax(1)
    return model, (predicted == y_held).double().mean().item()


def load_classifier() -> DigitClassifier:
    """The trained digit classifier shipped in `CLASSIFIER_FILE`, in eval mode on the CPU.
    Its header's metadata records how it was made (held-out accuracy, steps, seed, torch version)."""
    try:
        load_weights(model := DigitClassifier(), load_weight_file(CLASSIFIER_FILE)[0], source=str(CLASSIFIER_FILE))
    except CheckpointError as e:
        raise CheckpointError(f"the shipped digit classifier {CLASSIFIER_FILE} is missing or corrupt: reinstall "
                              f"ldm, or recreate it with `python scripts/train_classifier.py`\n{e}") from e
    return model.eval()


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(μ1, Σ1) and N(μ2, Σ2), as FID reports it:

        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)  [Heusel et al. 2017, Eq. 6; Dowson & Landau 1982]

    Σ1 Σ2 is not symmetric, but it is similar to S = Σ1^½ Σ2 Σ1^½, which is symmetric PSD,
    so Tr (Σ1 Σ2)^½ = Σᵢ √λᵢ(S), found with two symmetric eigendecompositions in float64.
    Shapes: mu (D,), sigma (D, D), as tensors or arrays.
    """
    mu1, sigma1, mu2, sigma2 = (np.asarray(a.detach().cpu() if torch.is_tensor(a) else a, dtype=np.float64)
                                for a in (mu1, sigma1, mu2, sigma2))
    D = mu1.size
    if (mu1.shape, mu2.shape, sigma1.shape, sigma2.shape) != ((D,), (D,), (D, D), (D, D)):
        raise ValueError(f"frechet_distance needs mu (D,) and sigma (D, D), got mu1 {mu1.shape}, "
                         f"sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    # Covariances are PSD; clipping removes the tiny negative eigenvalues of round-off.
    lam1, v1 = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v1 * np.sqrt(lam1.clip(min=0))) @ v1.T
    s = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((s + s.T) / 2).clip(min=0)).sum()
    d2 = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(d2, 0.0))


@dataclass(frozen=True)
class DigitReport:
    """What `evaluate_digits` measured on `n` samples; see the module docstring for each number."""

    n: int
    confident_share: float
    mean_confidence: float
    class_counts: tuple[int, ...]
    class_entropy: float
    frechet_distance: float
    label_accuracy: float | None
    threshold: float
    frechet_reference: str = "real MNIST"  # what the Fréchet distance compared with

    def summary(self) -> str:
        rows = [
            (f"confident (p ≥ {self.threshold:g})",
             f"{self.confident_share:.1%} of {self.n}   (mean max-probability {self.mean_confidence:.3f})"),
            ("class entropy", f"{self.class_entropy:.3f}   (1 = all ten digits equally often)"),
            ("class counts 0–9", " ".join(str(c) for c in self.class_counts)),
            ("Fréchet distance", f"{self.frechet_distance:.2f}   (features vs {self.frechet_reference}; lower is better)"),
        ]
        if self.label_accuracy is not None:
            rows.append(("label accuracy", f"{self.label_accuracy:.1%}   (sample asked to be k is read as k)"))
        return "\n".join(f"{name:<22} {value}" for name, value in rows)


@torch.inference_mode()
def _features(classifier: DigitClassifier, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), softmax probabilities (N, 10)) in batches, on the classifier's device."""
    device = next(classifier.parameters()).device
    features = torch.cat([classifier.features(part.to(device)) for part in x.split(batch_size)])
    # In eval mode dropout is the identity, so the logits are just head(features): one pass, not two.
    return features.cpu(), classifier.head(features).softmax(1).cpu()


def _gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    return features.double().mean(0).numpy(), np.cov(features.double().numpy(), rowvar=False)


# Weak keys, so a discarded classifier frees its entry (a retrained one is a new object anyway).
_reference_stats: weakref.WeakKeyDictionary[DigitClassifier, tuple] = weakref.WeakKeyDictionary()


def _real_stats(classifier: DigitClassifier, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of all bundled real digits, computed once per classifier object."""
    if classifier not in _reference_stats:
        data = load_dataset("mnist-bundled")
        real = data.batch(torch.arange(len(data)))[0]
        _reference_stats[classifier] = _gaussian_stats(_features(classifier, real, batch_size)[0])
    return _reference_stats[classifier]


def evaluate_digits(
    samples: torch.Tensor, labels: torch.Tensor | None = None, *,
    classifier: DigitClassifier | None = None, threshold: float = 0.9, batch_size: int = 500,
    reference: torch.Tensor | None = None,
) -> DigitReport:
    """Score generated digits: confidence, class spread, Fréchet distance to all 10,000 real bundled
    digits (those the classifier trained on included; their statistics are computed once per classifier
    and kept in memory), and, given the requested `labels`, how often the classifier agrees.
    Shapes: samples float (N, 1, 28, 28) in [-1, 1], N ≥ 2; labels int (N,) in 0–9 or None.
    `classifier` defaults to `load_classifier()`; it is put in eval mode. `reference` (float (M, 1, 28, 28) in
    [-1, 1]) replaces the real digits as what the Fréchet distance compares with: the data a model was trained on
    where that is not MNIST as it is (the moved digits of the ``mnist-text`` captions).
    """
    if not (torch.is_tensor(samples) and samples.is_floating_point() and samples.shape[1:] == (1, 28, 28)
            and len(samples) >= 2):
        got = f"{samples.dtype} {tuple(samples.shape)}" if torch.is_tensor(samples) else type(samples).__name__
        raise ValueError(f"samples must be a float tensor (N, 1, 28, 28) with N ≥ 2, got {got}")
    lo, hi = samples.min().item(), samples.max().item()
    if lo < -2 or hi > 2:
        raise ValueError(f"samples must lie in [-1, 1] (overshoot up to ±2 is clipped), got values in "
                         f"[{lo:.3g}, {hi:.3g}]; rescale [0, 1] or [0, 255] images first")
    if labels is not None and (labels.shape != (len(samples),) or labels.is_floating_point()
                               or labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be integers 0–9 of shape ({len(samples)},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")

    classifier = (load_classifier() if classifier is None else classifier).eval()
    if reference is None:
        reference_stats = _real_stats(classifier, batch_size)
    elif reference.shape[1:] == (1, 28, 28) and len(reference) >= 2 and reference.is_floating_point():
        reference_stats = _gaussian_stats(_features(classifier, reference.clamp(-1, 1), batch_size)[0])
    else:
        raise ValueError(f"reference must be a float tensor (M, 1, 28, 28) with M ≥ 2, got "
                         f"{reference.dtype} {tuple(reference.shape)}")
    # A sampler's last x0 may overshoot [-1, 1] slightly; the classifier only ever saw [-1, 1].
    features, probs = _features(classifier, samples.clamp(-1, 1), batch_size)
    confidence, predicted = probs.max(1)
    counts = torch.bincount(predicted, minlength=NUM_CLASSES)
    p = counts[counts > 0].double() / len(samples)
    return DigitReport(
        n=len(samples),
        confident_share=(confidence >= threshold).double().mean().item(),
        mean_confidence=confidence.double().mean().item(),
        class_counts=tuple(counts.tolist()),
        class_entropy=float((p * (1 / p).log()).sum() / math.log(NUM_CLASSES)),
        frechet_distance=frechet_distance(*_gaussian_stats(features), *reference_stats),
        label_accuracy=None if labels is None else (predicted == labels.cpu()).double().mean().item(),
        threshold=threshold,
        frechet_reference="real MNIST" if reference is None else "the given reference digits",
    )


def load_samples_npy(path: str | os.PathLike) -> torch.Tensor:
    """Read samples saved as a float .npy array (N, 1, H, W) in [0, 1] (``ldm sample --npy``), as float32
    x = 2u − 1 in [-1, 1]; digits of another size than 28×28 (the latent recipe's 32×32) are resized by the caller."""
    array = np.load(Path(path), allow_pickle=False)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: expected a float array in [0, 1], got {array.dtype} (pixels 0–255? divide by 255)")
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"{path}: expected shape (N, 1, H, W) (grey digits), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: contains NaN or infinite values")
    if array.size and (array.min() < 0 or array.max() > 1):
        hint = " (samples in [-1, 1]? map them with (x + 1) / 2 first)" if array.min() < 0 else ""
        raise ValueError(f"{path}: values must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]{hint}")
    return torch.from_numpy(array.astype(np.float32)) * 2 - 1
