"""Digit measurements on hand-drawn strokes whose thickness, slant, size and position are known, and captions."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.data import load_dataset
from ldm.data.digits import NUMBER_WORDS, caption_digits, describe_digits, measure_digits, shift_digits


def stroke(width: float = 2.0, angle: float = 0.0, length: float = 16.0, centre=(0.5, 0.5), size: int = 28):
    """A straight anti-aliased stroke ``width`` pixels wide, ``angle`` degrees from vertical (> 0: its top leans
    right), centred ``centre`` pixels from the image centre (x right, y down; the default puts it on a pixel's
    centre, so a 1-pixel stroke is one column of full ink): uint8 (H, W)."""
    ys = torch.arange(size, dtype=torch.float32).view(size, 1) - (size - 1) / 2 - centre[1]
    xs = torch.arange(size, dtype=torch.float32).view(1, size) - (size - 1) / 2 - centre[0]
    a = math.radians(angle)
    along, across = -ys * math.cos(a) + xs * math.sin(a), xs * math.cos(a) + ys * math.sin(a)
    ink = (width / 2 + 0.5 - across.abs()).clamp(0, 1) * (length / 2 + 0.5 - along.abs()).clamp(0, 1)
    return (ink * 255).round().to(torch.uint8)


def test_thickness_is_the_stroke_width():
    widths = [1, 2, 3, 4, 5]
    measured = measure_digits(torch.stack([stroke(w) for w in widths])).thickness.tolist()
    assert measured == sorted(measured)
    for w, m in zip(widths, measured):
        assert m == pytest.approx(w * 16 / (16 + w), rel=0.15), (w, m)  # the stroke's ends are edges too
    slanted = measure_digits(torch.stack([stroke(3, angle=30), stroke(3)])).thickness
    assert slanted[0] == pytest.approx(slanted[1].item(), rel=0.15)  # an oblique stroke is no thicker


def test_slant_is_the_lean_in_degrees():
    slant = measure_digits(torch.stack([stroke(3, a) for a in (-25, -10, 0, 10, 25)])).slant.tolist()
    for expected, got in zip((-25, -10, 0, 10, 25), slant):
        assert got == pytest.approx(expected, abs=3), (expected, got)


def test_size_and_position():
    a = measure_digits(torch.stack([stroke(3, length=16, centre=(5.5, -2.5)), stroke(3, length=8)]))
    assert a.height.tolist() == pytest.approx([17, 9], abs=1) and a.width.tolist() == pytest.approx([3, 3], abs=1)
    assert (a.x[0].item(), a.y[0].item()) == pytest.approx((5.5, -2.5), abs=0.2) and a.size[0] > a.size[1]
    moved = measure_digits(shift_digits(torch.stack([stroke(3), stroke(3)])[:, None], torch.tensor([-4, 3])))
    assert moved.x.tolist() == pytest.approx([-3.5, 3.5], abs=0.2)


def test_bad_digits_are_named():
    with pytest.raises(ValueError, match="digit 1 has no ink"):
        measure_digits(torch.stack([stroke(), torch.zeros(28, 28, dtype=torch.uint8)]))
    with pytest.raises(ValueError, match="grayscale"):
        measure_digits(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_words_follow_the_measurements_within_each_class():
    digits = load_dataset("mnist-bundled")
    images, labels = digits.images[:1000], digits.labels[:1000]
    shifted = shift_digits(images, torch.tensor([-4, 0, 4]).repeat(334)[:1000])
    a = measure_digits(shifted)
    words = describe_digits(labels, a)
    for digit in range(10):
        mine = [i for i in range(1000) if labels[i] == digit]
        thick = [a.thickness[i] for i in mine if words[i]["thickness"] == "thick"]
        thin = [a.thickness[i] for i in mine if words[i]["thickness"] == "thin"]
        assert thick and thin and min(thick) > max(thin), digit  # thirds of the class, not of all digits
    assert all(words[i]["position"] == ("on the left", None, "on the right")[i % 3] for i in range(999))
    assert all((w["slant"] == "slanted right") == (a.slant[i] > 10) for i, w in enumerate(words))


def test_captions_name_the_digit_and_vary_their_wording():
    digits = load_dataset("mnist-bundled")
    images, labels = digits.images[:300], digits.labels[:300]
    a = measure_digits(images)
    captions = caption_digits(labels, a, seed=0)
    assert captions == caption_digits(labels, a, seed=0) and captions != caption_digits(labels, a, seed=1)
    for caption, label in zip(captions, labels.tolist()):
        words = caption.replace(",", " ").split()
        assert NUMBER_WORDS[label] in words or str(label) in words, caption
    assert len(set(captions)) > 100  # not one template: synonyms, orders, number words and numerals
    said = describe_digits(labels, a)
    for caption, words in zip(captions, said):
        if words["thickness"] == "thick":
            assert any(w in caption for w in ("thick", "bold", "heavy")), caption
        if words["slant"] == "slanted left":
            assert "left" in caption, caption


def test_the_mnist_text_source_is_captioned_and_shifted():
    from ldm.data.captions import load_captioned

    data = load_captioned("mnist-text", 32, 1, limit=200)
    assert data.images.shape == (200, 1, 32, 32) and data.images.dtype == torch.uint8 and len(data.captions) == 200
    x = measure_digits(data.images).x
    left = [i for i, c in enumerate(data.captions) if c.endswith(("on the left", "at the left"))]
    right = [i for i, c in enumerate(data.captions) if c.endswith(("on the right", "at the right"))]
    assert len(left) > 30 and len(right) > 30 and x[left].max() < 0 < x[right].min()
    assert load_captioned("mnist-text", 28, 1, limit=200).captions == data.captions  # measured at 28², seeded
