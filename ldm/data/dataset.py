"""In-memory image datasets and `load_dataset`, the one entry point for every source.

Everything is held as one uint8 tensor (N, C, H, W): the datasets used here
are small enough (MNIST 47 MB, CIFAR-10 150 MB), and a batch is then a single
index operation, with no DataLoader workers to tune.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from . import cifar, mnist
from .download import cache_root
from .folder import load_image_folder

DATASETS: tuple[str, ...] = ("mnist-bundled", "mnist", "fashion-mnist", "cifar10", "folder")


@dataclass
class ImageDataset:
    """Images, optional class labels, and how to turn them into a training batch.

    Shapes: images uint8 (N, C, H, W) with H == W; labels int64 (N,) or None.
    `num_classes` is None exactly when `labels` is.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int | None
    hflip: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"images must be square, got H×W = {self.images.shape[2]}×{self.images.shape[3]}")
        if (self.labels is None) != (self.num_classes is None):
            raise ValueError("give both labels and num_classes, or neither")
        if self.labels is not None and (self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),)):
            raise ValueError(
                f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset({self.name!r}, {n} × {c} × {h} × {w}, num_classes={self.num_classes}, hflip={self.hflip})"

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images at `indices` scaled to [-1, 1], randomly mirrored if `hflip`, and their labels.

            x = u / 127.5 − 1   (u ∈ {0, …, 255}, so 0 → −1 and 255 → 1)

        With `hflip`, each sample is mirrored left-right independently with
        probability ½, drawn from `generator` so a seeded run repeats exactly.
        Shapes: indices (B,) → x float32 (B, C, H, W), labels int64 (B,) or None.
        """
        x = self.images[indices].float() / 127.5 - 1
        if self.hflip:
            device = generator.device if generator is not None else "cpu"
            flip = torch.rand(len(x), generator=generator, device=device).to(x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        labels = self.labels[indices] if self.labels is not None else None
        return x, labels


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    split: Literal["train", "test"] = "train",
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load a dataset by name (see `DATASETS`) or from a folder of images.

    - "mnist-bundled": the 10,000 MNIST test digits shipped with ldm (any split); never downloads.
    - "mnist", "fashion-mnist", "cifar10": files in `<data_dir>/<name>/`, where `data_dir`
      defaults to `$LDM_CACHE/datasets` or `~/.cache/ldm/datasets`; downloaded if missing.
    - "folder" with `data_dir`, or a directory path as `name`: every image under it,
      unlabelled; `image_size` is required. Known names win over a directory of the same name.

    `image_size` resizes (bilinear, antialiased) and `channels` converts gray ↔ RGB;
    by default each dataset keeps its native size and channels.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")

    if name not in DATASETS:
        if not Path(name).expanduser().is_dir():
            raise ValueError(
                f"unknown dataset {name!r}: not one of {', '.join(DATASETS)}, and not an existing directory"
            )
        name, data_dir = "folder", Path(name).expanduser()

    if name == "folder":
        if data_dir is None:
            raise ValueError("dataset 'folder' needs data_dir, the folder of images")
        if image_size is None:
            raise ValueError(f"loading the image folder {data_dir} needs image_size (images differ in size)")
        images = load_image_folder(data_dir, image_size, channels or 3)
        return ImageDataset(images, None, None, hflip=True, name=str(data_dir))

    if name == "mnist-bundled":
        images, labels = mnist.load_bundled_mnist()
    elif name in ("mnist", "fashion-mnist"):
        images, labels = mnist.load_idx_dataset(name, cache_root(data_dir) / name, split, download=download)
    else:
        images, labels = cifar.load_cifar10(cache_root(data_dir) / name, split, download=download)
    images = resize_images(convert_channels(images, channels or images.shape[1]), image_size or images.shape[2])
    num_classes = cifar.NUM_CLASSES if name == "cifar10" else mnist.NUM_CLASSES
    return ImageDataset(images, labels, num_classes, hflip=name == "cifar10", name=name)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray → RGB by repeating; RGB → gray by ITU-R 601-2 luma, as PIL's "L" mode does:

        Y = 0.299 R + 0.587 G + 0.114 B

    Shapes: images uint8 (N, C, H, W) → (N, channels, H, W).
    """
    have = images.shape[1]
    if have == channels:
        return images
    if (have, channels) == (1, 3):
        return images.repeat(1, 3, 1, 1)
    if (have, channels) == (3, 1):
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize square uint8 images to size × size, bilinear with antialiasing when shrinking.

    Works in chunks so resizing CIFAR-10 never holds all 50,000 images as float32.
    Shapes: images uint8 (N, C, H, W) → (N, C, size, size).
    """
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [
        F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for part in images.split(chunk)
    ]
    return torch.cat(out)
