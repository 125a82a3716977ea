"""A folder of image files as one square, fixed-size uint8 tensor.

Every image under the folder (recursively) is center-cropped to a square and
resized to `image_size`; this keeps the subject's aspect ratio instead of
squashing it. Files are sorted by relative path so the same folder always
gives the same order, on every platform.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (any case of `IMAGE_EXTENSIONS`), sorted by relative path.

    Hidden files and folders (names starting with ".") are skipped: they are
    usually metadata, such as macOS `._name.jpg` files, not images.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} does not exist or is not a directory")
    found = [
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def load_image(path: str | os.PathLike, image_size: int, channels: int = 3) -> np.ndarray:
    """One image, center-cropped to a square and resized: uint8 (image_size, image_size, channels)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    try:
        with Image.open(path) as image:
            # Phones store rotation as EXIF metadata; apply it so photos are upright.
            image = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop before resizing: resize(box=...) would let the filter reach pixels outside the square.
    # PIL's bicubic widens its kernel when downsampling, so it antialiases.
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)


def load_image_folder(root: str | os.PathLike, image_size: int, channels: int = 3) -> torch.Tensor:
    """All images under `root` as uint8 (N, channels, image_size, image_size), in `find_images` order."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    paths = find_images(root)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {Path(root).resolve()}")
    images = np.stack([load_image(path, image_size, channels) for path in paths])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
