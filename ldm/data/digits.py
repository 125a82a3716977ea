"""What a handwritten digit looks like, measured, and said in words: captions for a text-to-image toy model.

Each measurement reads the ink u ∈ [0, 1] of a grayscale digit (pixel / 255), with x to the right and y downwards:

    thickness   Σ u / (½ Σ |∇u|)             ink mass over half its edge length: a stroke of width w and length L
                                               has mass w·L and two edges of length L, so this is w, in pixels
    slant       atan(−cov_u(x, y) / var_u(y))  the shear of the ink's second moments, in degrees; > 0 leans right
                                               (its top is further right than its bottom), as "/" does
    height      rows holding ink (u > ½): the digit's height in pixels; width likewise over columns
    x, y        the ink's centroid relative to the image centre, in pixels (> 0: right of, below the centre)

MNIST's digits were size-normalised into a 20 × 20 box and centred by their centre of mass, so size and position
barely vary between them; ``shift_digits`` moves them left or right for the position words, and the words for
thickness, slant and size are relative to the digit's class (``caption_digits``: a "thick 1" is thick for a 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The words a caption may use for each side of an attribute, and how strongly a digit must lean to be "slanted".
WORDS = {
    "thick": ("thick", "bold", "heavy"), "thin": ("thin", "fine", "light"),
    "large": ("large", "big"), "small": ("small", "little"),
    "slanted right": ("slanted right", "leaning right", "tilted to the right"),
    "slanted left": ("slanted left", "leaning left", "tilted to the left"),
    "upright": ("upright", "straight"),
    "on the left": ("on the left", "at the left"), "on the right": ("on the right", "at the right"),
}
SLANT_DEGREES = 10.0
SHIFT_PIXELS = 2.0  # a centroid this far from the centre is "on the left" / "on the right"


@dataclass
class DigitAttributes:
    """Per-digit measurements, each a float tensor of shape (N,) (see the module's docstring)."""

    thickness: torch.Tensor
    slant: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    @property
    def size(self) -> torch.Tensor:
        """√(height · width): one number for "small" and "large"."""
        return (self.height * self.width).sqrt()


def _ink(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, H, W), (N, H, W) or (H, W) → float ink in [0, 1], (N, H, W)."""
    if images.dim() == 4:
        if images.shape[1] != 1:
            raise ValueError(f"digits are grayscale: expected (N, 1, H, W), got {tuple(images.shape)}")
        images = images[:, 0]
    elif images.dim() == 2:
        images = images[None]
    elif images.dim() != 3:
        raise ValueError(f"expected digits of shape (N, 1, H, W), (N, H, W) or (H, W), got {tuple(images.shape)}")
    return images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)


def measure_digits(images: torch.Tensor) -> DigitAttributes:
    """Thickness, slant, height, width and centroid of each digit (uint8 ink on black, as MNIST)."""
    u = _ink(images)
    n, h, w = u.shape
    mass = u.sum((1, 2))
    if (mass == 0).any():
        raise ValueError(f"digit {int((mass == 0).nonzero()[0])} has no ink")
    dx = torch.nn.functional.pad(u.diff(dim=2), (0, 1))
    dy = torch.nn.functional.pad(u.diff(dim=1), (0, 0, 0, 1))
    edge = (dx**2 + dy**2).sqrt().sum((1, 2))
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) - (w - 1) / 2
    cx, cy = (u * xs).sum((1, 2)) / mass, (u * ys).sum((1, 2)) / mass
    cov_xy = (u * (xs - cx.view(n, 1, 1)) * (ys - cy.view(n, 1, 1))).sum((1, 2)) / mass
    var_y = (u * (ys - cy.view(n, 1, 1)) ** 2).sum((1, 2)) / mass
    inked = u > 0.5
    return DigitAttributes(thickness=mass / (edge / 2), slant=torch.rad2deg(torch.atan(-cov_xy / var_y)),
                           height=inked.any(2).sum(1).float(), width=inked.any(1).sum(1).float(), x=cx, y=cy)


def shift_digits(images: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each image moved dx[i] whole pixels to the right (left when negative), zeros shifted in; shape kept."""
    out = torch.zeros_like(images)
    w = images.shape[-1]
    for i, d in enumerate(dx.tolist()):
        d = int(d)
        if abs(d) >= w:
            continue
        if d >= 0:
            out[i, ..., d:] = images[i, ..., : w - d]
        else:
            out[i, ..., :d] = images[i, ..., -d:]
    return out


def describe_digits(labels: torch.Tensor, attributes: DigitAttributes) -> list[dict[str, str | None]]:
    """Each digit's attributes as words: thickness and size by the thirds of its own class (the lightest third
    "thin", the heaviest "thick"; None between), slant beyond ±``SLANT_DEGREES``, position beyond ±``SHIFT_PIXELS``."""
    words: list[dict[str, str | None]] = [{} for _ in range(len(labels))]
    for name, low, high, values in (("thickness", "thin", "thick", attributes.thickness),
                                    ("size", "small", "large", attributes.size)):
        for digit in labels.unique().tolist():
            members = (labels == digit).nonzero().flatten()
            lo, hi = torch.quantile(values[members], torch.tensor([1 / 3, 2 / 3])).tolist()
            for i in members.tolist():
                words[i][name] = low if values[i] < lo else high if values[i] > hi else None
    for i in range(len(labels)):
        s, x = attributes.slant[i].item(), attributes.x[i].item()
        words[i]["slant"] = ("slanted right" if s > SLANT_DEGREES else "slanted left" if s < -SLANT_DEGREES
                             else "upright" if abs(s) < SLANT_DEGREES / 3 else None)
        words[i]["position"] = "on the right" if x > SHIFT_PIXELS else "on the left" if x < -SHIFT_PIXELS else None
    return words


def caption_digits(labels: torch.Tensor, attributes: DigitAttributes, seed: int = 0) -> list[str]:
    """A caption per digit from its label and measured attributes (``describe_digits``), with synonyms, number words
    or numerals and word order drawn at random (seeded), so that a prompt means more than a class id:
    "a thick small seven slanted right", "the digit 1, thin, on the left", "a 4"."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    def coin() -> bool:
        return bool(torch.rand((), generator=g) < 0.5)

    captions = []
    for label, said in zip(labels.tolist(), describe_digits(labels, attributes)):
        number = pick((NUMBER_WORDS[label], str(label)))
        adjectives = [pick(WORDS[said[k]]) for k in ("size", "thickness") if said[k]]
        adjectives = adjectives[::-1] if coin() else adjectives
        phrases = [pick(WORDS[said[k]]) for k in ("slant", "position") if said[k]]
        if adjectives and coin():  # "a thick small 7 slanted right on the left"
            captions.append(" ".join(["a", *adjectives, number, *phrases]))
        else:  # "the digit 7, thick and small, slanted right, on the left"
            head = pick((f"a {number}", f"the digit {number}", f"the number {number}"))
            captions.append(", ".join([head, *([" and ".join(adjectives)] if adjectives else []), *phrases]))
    return captions

