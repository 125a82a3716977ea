"""A training run's directory, guarded: checked before the first step, never overwritten by accident.

A run directory that already holds a checkpoint is continued with ``--resume`` (``resume=True``), started
over with ``--overwrite`` (``overwrite=True``: the old checkpoint is kept as ``checkpoint.previous.pt``
until the new run's first save), and refused otherwise: re-running a command never destroys a run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .runs import CHECKPOINT

BACKUP = "checkpoint.previous.pt"


def check_run_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make sure ``out`` is a writable directory (created if need be) that may be trained into.

    Cheap, so ``ldm train`` calls it before loading any data: a bad ``--out`` fails at once, not after the
    training budget is spent."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"--out {out} is not a writable directory ({e.strerror or e}); choose another --out") from None
    checkpoint = out / CHECKPOINT
    if checkpoint.is_file() and not (resume or overwrite):
        stat = checkpoint.stat()
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
        raise ValueError(f"{out} already holds a run ({CHECKPOINT}, {stat.st_size / 2**20:.1f} MiB, written {written}): "
                         f"add --resume to continue it, or --overwrite to start over (its checkpoint is kept as "
                         f"{BACKUP} until the new run's first save)")
    return out


def check_free_space(out: Path, needed: int) -> None:
    """A checkpoint of ``needed`` bytes must fit beside the current one (it is written to a temporary file first)."""
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ValueError(f"not enough free space in {out}: a checkpoint needs about {needed / 2**20:.0f} MiB, "
                         f"{free / 2**20:.0f} MiB are free")


def back_up_checkpoint(out: Path) -> bool:
    """Set the checkpoint in ``out`` aside as ``BACKUP`` (a run is starting over); whether there was one."""
    if not (out / CHECKPOINT).is_file():
        return False
    os.replace(out / CHECKPOINT, out / BACKUP)
    return True
