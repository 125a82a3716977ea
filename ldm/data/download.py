"""Cached, checksummed download of dataset files.

A dataset is a list of `Resource`s (file name, published checksum, mirror URLs).
`fetch` finds each file in a directory, or downloads it there, and checks its
checksum either way, so a file placed by hand is trusted exactly as much as a
downloaded one. Downloads go to a temporary file beside the target and are
moved into place with `os.replace` only once the checksum matches: an
interrupted or corrupt download never leaves a file that looks finished.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

_CHUNK = 1 << 20
_TIMEOUT_S = 30


class DatasetUnavailableError(RuntimeError):
    """Dataset files are missing and could not be downloaded."""


class ChecksumError(ValueError):
    """A file's contents do not match its published checksum."""


@dataclass(frozen=True)
class Resource:
    """One dataset file: its name, its published checksum, and where to get it.

    `urls` are mirrors, tried in order; empty means the file is never downloaded.
    """

    filename: str
    checksum: str
    urls: tuple[str, ...] = ()
    algorithm: Literal["md5", "sha256"] = "md5"


def cache_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Where datasets live: `data_dir`, else `$LDM_CACHE/datasets`, else `~/.cache/ldm/datasets`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if env := os.environ.get("LDM_CACHE"):
        return Path(env).expanduser() / "datasets"
    return Path.home() / ".cache" / "ldm" / "datasets"


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in chunks so large archives need little memory."""
    # MD5 is what the dataset authors publish; it guards against corruption, not attackers.
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, resource: Resource) -> None:
    """Raise `ChecksumError` naming the file and both hashes unless `path` matches `resource`."""
    actual = file_digest(path, resource.algorithm)
    if actual != resource.checksum.lower():
        raise ChecksumError(
            f"{path} is corrupt or truncated: expected {resource.algorithm} "
            f"{resource.checksum}, got {actual}. Delete it to download it again."
        )


def fetch(resources: Sequence[Resource], directory: str | os.PathLike, *, download: bool = True) -> list[Path]:
    """Return the verified paths of `resources` in `directory`, downloading the missing ones.

    Raises `ChecksumError` for a present file with the wrong checksum, and
    `DatasetUnavailableError` listing every file still missing, the directory to
    place it in, and each URL tried with the reason it failed.
    """
    directory = Path(directory)
    paths = [directory / r.filename for r in resources]
    failures: dict[Resource, list[str]] = {}
    for resource, path in zip(resources, paths):
        if path.is_file():
            verify(path, resource)
        elif download and resource.urls:
            directory.mkdir(parents=True, exist_ok=True)
            reasons = _download_from_mirrors(resource, path)
            if reasons:
                failures[resource] = reasons
        else:
            failures[resource] = []
    if failures:
        raise DatasetUnavailableError(_unavailable_message(directory, failures, download))
    return paths


def _download_from_mirrors(resource: Resource, path: Path) -> list[str]:
    """Try each mirror in turn; return why each failed, or [] once one succeeded."""
    reasons = []
    for url in resource.urls:
        try:
            _download(url, path, resource)
            return []
        except (OSError, ValueError, http.client.HTTPException) as error:
            # URLError and timeouts are OSErrors; ValueError covers a bad URL or ChecksumError.
            reasons.append(f"{url}: {error}")
    return reasons


def _download(url: str, path: Path, resource: Resource) -> None:
    """Stream `url` into a temporary file beside `path`, check it, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        # Some servers refuse urllib's default User-Agent.
        request = urllib.request.Request(url, headers={"User-Agent": "ldm"})
        digest = hashlib.new(resource.algorithm, usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != resource.checksum.lower():
            raise ChecksumError(
                f"downloaded {path.name} is corrupt or truncated: expected {resource.algorithm} "
                f"{resource.checksum}, got {digest.hexdigest()}"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unavailable_message(directory: Path, failures: dict[Resource, list[str]], download: bool) -> str:
    lines = [f"Missing dataset file(s). Place them by hand in\n    {directory.resolve()}"]
    for resource, reasons in failures.items():
        lines.append(f"  {resource.filename}  ({resource.algorithm} {resource.checksum})")
        if reasons:
            lines.extend(f"      tried {reason}" for reason in reasons)
        elif resource.urls:
            lines.append(f"      from {' or '.join(resource.urls)} (not tried: download=False)")
    return "\n".join(lines)
