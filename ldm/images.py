"""Turning tensors into pictures people look at: grids, strips, animations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats → [0, 255] uint8, same shape."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile (N, C, H, W) images in [−1, 1] into one (C, H', W') uint8 image, ``nrow`` per row."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i, img in enumerate(to_uint8(images)):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = img
    return grid


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) uint8 → PIL image (grayscale for C = 1)."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int = 1) -> Image.Image:
    """(N, C, H, W) images in [−1, 1] as one PIL grid; ``scale`` enlarges small images."""
    img = to_pil(make_grid(images, nrow))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save (N, C, H, W) images in [−1, 1] as one PNG grid (``grid_image``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow, scale).save(path)
    return path


def save_strip(rows: Sequence[torch.Tensor], path: str | Path, scale: int = 1) -> Path:
    """Save several rows of images as one grid: ``rows[i]`` is (K, C, H, W), all K equal."""
    stacked = torch.cat(list(rows))
    return save_grid(stacked, path, nrow=rows[0].shape[0], scale=scale)


def save_gif(frames: Sequence[torch.Tensor], path: str | Path, duration_ms: int = 80, scale: int = 1) -> Path:
    """Save a sequence of (N, C, H, W) batches as an animated GIF, one grid per frame; the last frame lingers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics = [to_pil(make_grid(f)) for f in frames]
    if scale > 1:
        pics = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pics]
    durations = [duration_ms] * (len(pics) - 1) + [max(1000, duration_ms)]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return path
