"""Fine-tuning data: a few images and what each one shows, for LoRA, DreamBooth and textual inversion.

    DIR/dog1.jpg + DIR/dog1.txt ("a photo of sks dog on a beach")   a caption per image (a missing .txt: ""),
    DIR/*.jpg with caption="a photo of sks dog"                       or one caption for all (DreamBooth),
    "mnist-bundled:3"                                                the bundled MNIST test set's 3s (toy runs).

Images are center-cropped to a square and resized (``ldm.data.folder.load_image``): the subject keeps its aspect
ratio instead of being squashed. Every unreadable file is named at once, so one run finds all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import load_dataset, resize_images
from .digits import caption_digits, measure_digits, shift_digits
from .folder import IMAGE_EXTENSIONS, find_images, load_image

MNIST_PREFIX = "mnist-bundled:"
MNIST_TEXT = "mnist-text"  # every bundled digit, captioned from what it looks like (``ldm.data.digits``)


@dataclass
class CaptionedImages:
    """uint8 images (N, C, S, S), a caption per image, and a class label per image (MNIST digits) or None."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return len(self.images)


def load_captioned(source: str | os.PathLike, resolution: int, channels: int, caption: str | None = None,
                   limit: int | None = None) -> CaptionedImages:
    """A folder of images with optional same-named ``.txt`` captions (``caption`` overrides them all),
    ``mnist-bundled:D`` (digit D), or ``mnist-text`` (every digit, captioned by its looks). ``limit`` keeps the first
    images. ValueError naming the folder when it holds no image, and naming every file that cannot be read."""
    source = str(source)
    if source.startswith(MNIST_PREFIX):
        return mnist_digit(source, resolution, channels, caption, limit)
    if source == MNIST_TEXT:
        return captioned_mnist(resolution, channels, limit)
    root, paths = Path(source).expanduser(), image_paths(source, limit)
    images, bad = [], []
    for path in paths:
        try:
            images.append(load_image(path, resolution, channels))
        except ValueError as error:
            bad.append(f"{path} ({error.__cause__ or error})")
    if bad:
        raise ValueError(f"--data {root}: cannot read {len(bad)} of {len(paths)} images:\n  " + "\n  ".join(bad))
    captions = [caption if caption is not None else read_caption(path) for path in paths]
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return CaptionedImages(tensor, captions, None, root.name)


def image_paths(source: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """The images a folder source holds (the first ``limit``); cheap, so a command checks ``--data`` before it loads
    a model. ValueError naming the folder when there is no such folder or no image in it."""
    root = Path(source).expanduser()
    if str(source).startswith(MNIST_PREFIX) or str(source) == MNIST_TEXT:
        return []
    if not root.is_dir():
        raise ValueError(f"--data {root}: no such folder (expected a folder of images, or {MNIST_PREFIX}D)")
    paths = find_images(root)[:limit]
    if not paths:
        raise ValueError(f"--data {root.resolve()}: no images in it ({', '.join(IMAGE_EXTENSIONS)}, any case)")
    return paths


def read_caption(image: Path) -> str:
    """The caption beside an image (``dog1.jpg`` → ``dog1.txt``), one line of text; "" without one."""
    text = image.with_suffix(".txt")
    return " ".join(text.read_text(encoding="utf-8").split()) if text.is_file() else ""


def mnist_digit(source: str, resolution: int, channels: int, caption: str | None,
                limit: int | None) -> CaptionedImages:
    """The bundled MNIST test digits of one class (``mnist-bundled:3``), labelled with it, captioned ``caption``."""
    digit = source.removeprefix(MNIST_PREFIX)
    if not digit.isdigit() or int(digit) > 9:
        raise ValueError(f"--data {source}: expected {MNIST_PREFIX}D with a digit D from 0 to 9")
    data = load_dataset("mnist-bundled", channels=channels)
    keep = (data.labels == int(digit)).nonzero().flatten()[:limit]
    images = resize_images(data.images[keep], resolution)  # the chosen ones only
    return CaptionedImages(images.clone(), [caption or ""] * len(keep), data.labels[keep].clone(), f"mnist-{digit}")


SHIFTS = (-4, -3, 0, 3, 4)  # the horizontal moves ``captioned_mnist`` draws from: left, centred or right


def captioned_mnist(resolution: int = 28, channels: int = 1, limit: int | None = None, seed: int = 0):
    """The bundled MNIST test digits (the first ``limit``), each moved by a seeded draw from ``SHIFTS`` and captioned
    from its label and what was measured on it (``caption_digits``): the ``mnist-text`` data source."""
    data = load_dataset("mnist-bundled", channels=1)
    images, labels = data.images[:limit], data.labels[:limit]
    g = torch.Generator().manual_seed(seed)
    shifted = shift_digits(images, torch.tensor(SHIFTS)[torch.randint(len(SHIFTS), (len(images),), generator=g)])
    captions = caption_digits(labels, measure_digits(shifted), seed)
    shifted = resize_images(shifted, resolution)
    return CaptionedImages(shifted.expand(-1, channels, -1, -1).clone(), captions, labels.clone(), "mnist-text")


def write_digit_folder(digit: int, out: str | os.PathLike, limit: int = 100) -> Path:
    """Write the first ``limit`` bundled MNIST test images of ``digit`` to ``out`` as 28×28 PNGs (``3_0000.png`` …):
    a small image folder to fine-tune a toy model on, as one would a folder of photos."""
    data = mnist_digit(f"{MNIST_PREFIX}{digit}", 28, 1, None, limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(data.images):
        Image.fromarray(image[0].numpy()).save(out / f"{digit}_{i:04d}.png")
    return out


def long_captions(captions: list[str], tokenizer) -> int:
    """How many captions the text encoder cannot read whole: longer than its 77 tokens (75 and start and end)."""
    lengths = {text: len(tokenizer.encode(text)) for text in set(captions)}  # DreamBooth: one caption N times
    return sum(lengths[text] > tokenizer.max_length - 2 for text in captions)


__all__ = ["CaptionedImages", "MNIST_PREFIX", "image_paths", "load_captioned", "long_captions", "mnist_digit",
           "read_caption", "write_digit_folder"]
