"""CIFAR-10, binary version [Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html].

The binary archive holds `cifar-10-batches-bin/data_batch_{1..5}.bin` (train) and
`test_batch.bin` (test). Each is a run of 3,073-byte records:

    label  1 byte (0..9)
    pixels 3,072 bytes = 3 × 32 × 32, channel-major (all red, then green, then blue),
           each channel row-major

We use it rather than the "python version" because unpickling a downloaded file
can run arbitrary code. The records are read straight out of the tar stream;
nothing is extracted to disk, so a hostile member path cannot escape the cache.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .download import Resource, fetch

# Module-level so tests can substitute a tiny archive with its own checksum.
CIFAR10_RESOURCE = Resource(
    "cifar-10-binary.tar.gz",
    "c32a1d4ab5d03f1284b67883e8d87530",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
)

_FOLDER = "cifar-10-batches-bin"
SPLIT_MEMBERS: dict[str, tuple[str, ...]] = {
    "train": tuple(f"{_FOLDER}/data_batch_{i}.bin" for i in range(1, 6)),
    "test": (f"{_FOLDER}/test_batch.bin",),
}
NUM_CLASSES = 10
_SIZE = 32
_RECORD_BYTES = 1 + 3 * _SIZE * _SIZE


def read_cifar10(archive: str | os.PathLike, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split from the binary archive: images uint8 (N, 3, 32, 32), labels int64 (N,).

    Raises `ValueError` naming the archive if a member is missing, not a regular
    file, or not a whole number of records.
    """
    archive = Path(archive)
    wanted = SPLIT_MEMBERS[split]
    found: dict[str, bytes] = {}
    # One pass in stream order: gzip cannot seek backwards cheaply.
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name not in wanted:
                continue
            if not member.isfile():
                raise ValueError(f"{archive}: member {member.name} is not a regular file")
            found[member.name] = tar.extractfile(member).read()

    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(
            f"{archive} lacks {', '.join(missing)}; is it the CIFAR-10 binary archive "
            f"({CIFAR10_RESOURCE.filename}) and not the python or matlab version?"
        )
    batches = []
    for name in wanted:
        data = found[name]
        if len(data) % _RECORD_BYTES:
            raise ValueError(
                f"{archive}: {name} holds {len(data)} bytes, not a whole number of "
                f"{_RECORD_BYTES}-byte records (truncated or corrupt)"
            )
        batches.append(np.frombuffer(data, np.uint8).reshape(-1, _RECORD_BYTES))
    records = np.concatenate(batches)

    labels = records[:, 0].astype(np.int64)
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{archive}: label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    images = records[:, 1:].reshape(-1, 3, _SIZE, _SIZE)  # already (N, C, H, W): the format is CHW
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def load_cifar10(
    directory: str | os.PathLike, split: Literal["train", "test"], *, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fetch (or find) the verified archive in `directory` and read `split` from it."""
    (archive,) = fetch([CIFAR10_RESOURCE], directory, download=download)
    return read_cifar10(archive, split)
