"""MNIST and Fashion-MNIST in the idx format.

An idx file is a big-endian header followed by raw unsigned bytes:

    magic  u4   0x0000 08 D   (0x08 = unsigned byte data, D = number of dims)
    dims   D × u4             (N for labels; N, 28, 28 for images)
    data   N × … bytes, row-major

Labels use magic 0x00000801, images 0x00000803 [LeCun et al., http://yann.lecun.com/exdb/mnist/].
Both datasets use the same file names, so each gets its own cache directory.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .download import Resource, fetch

_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

# Published MD5s of the .gz files, as listed by torchvision's datasets/mnist.py.
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _resources(mirrors: tuple[str, ...], md5: dict[str, str]) -> dict[str, Resource]:
    return {name: Resource(name, checksum, tuple(m + name for m in mirrors)) for name, checksum in md5.items()}


# Dataset name → file name → Resource. Module-level so tests can substitute their own files.
IDX_RESOURCES: dict[str, dict[str, Resource]] = {
    "mnist": _resources(_MNIST_MIRRORS, _MNIST_MD5),
    "fashion-mnist": _resources(_FASHION_MIRRORS, _FASHION_MD5),
}

# The MNIST test set shipped with the package. Its .gz files were re-compressed,
# so they are checked against the SHA-256 list beside them, not the published MD5s.
BUNDLED_MNIST_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist"

NUM_CLASSES = 10


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes with `ndim` dimensions, gzipped or not.

    Raises `ValueError` naming the file for a wrong magic number or a size that
    disagrees with the header (a truncated or corrupt file).
    """
    path = Path(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"  # gzip magic, so a renamed file still reads
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({error})") from error

    expected_magic = 0x0800 | ndim
    header_bytes = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big")
    if len(data) < header_bytes or magic != expected_magic:
        raise ValueError(
            f"{path}: not an idx file of {ndim}-d unsigned bytes: magic number 0x{magic:08x}, "
            f"expected 0x{expected_magic:08x} (or the file is shorter than its {header_bytes}-byte header)"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected_bytes = math.prod(shape)
    found_bytes = len(data) - header_bytes
    if found_bytes != expected_bytes:
        problem = "truncated" if found_bytes < expected_bytes else "has trailing bytes"
        raise ValueError(
            f"{path}: {problem}: header promises shape {shape} = {expected_bytes} bytes of data, found {found_bytes}"
        )
    return np.frombuffer(data, np.uint8, offset=header_bytes).reshape(shape)


def load_idx_dataset(
    name: Literal["mnist", "fashion-mnist"],
    directory: str | os.PathLike,
    split: Literal["train", "test"],
    *,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST-format split from `directory`, downloading missing files.

    Files unpacked by hand (no `.gz`) are read when the `.gz` is absent; they have
    no published checksum, so only their header and size are checked.
    Returns images uint8 (N, 1, 28, 28) and labels int64 (N,).
    """
    directory = Path(directory)
    prefix = {"train": "train", "test": "t10k"}[split]
    wanted = [IDX_RESOURCES[name][f"{prefix}-{kind}.gz"] for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    unpacked = {r: directory / r.filename.removesuffix(".gz") for r in wanted}
    to_fetch = [r for r in wanted if not unpacked[r].is_file() or (directory / r.filename).is_file()]
    fetched = dict(zip(to_fetch, fetch(to_fetch, directory, download=download)))
    images_path, labels_path = (fetched.get(r, unpacked[r]) for r in wanted)
    return _to_tensors(read_idx(images_path, 3), read_idx(labels_path, 1), images_path)


def load_bundled_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000-image MNIST test set shipped in `ldm/assets/mnist`; never downloads."""
    sums = (BUNDLED_MNIST_DIR / "SHA256SUMS").read_text().split("\n")
    checksums = {name: digest for digest, name in (line.split() for line in sums if line.strip())}
    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    resources = [Resource(n, checksums[n], algorithm="sha256") for n in names]
    images_path, labels_path = fetch(resources, BUNDLED_MNIST_DIR, download=False)
    return _to_tensors(read_idx(images_path, 3), read_idx(labels_path, 1), images_path)


def _to_tensors(images: np.ndarray, labels: np.ndarray, source: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if len(images) != len(labels):
        raise ValueError(f"{source.parent}: {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{source.parent}: label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    # frombuffer views are read-only; copy into tensors that own their memory.
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
