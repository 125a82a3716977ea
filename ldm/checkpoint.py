"""Saving and loading training state and third-party weights: atomically, and without ever running pickled code."""

from __future__ import annotations

import errno
import io
import json
import os
import pickletools
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import safetensors.torch
import torch
from torch import _weights_only_unpickler
from torch._utils import IMPORT_MAPPING, NAME_MAPPING


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, or of another model."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a file through ``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``.

    A rename within one filesystem is atomic, so a kill at any moment (or a second process writing the same
    file) leaves either the old file or the new one, never half of one. A write that fails (a full disk)
    removes its temporary file, leaves the old file as it was, and raises ``CheckpointError`` naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())  # mkstemp's file is 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            kept = f"; {path.name} is unchanged" if path.exists() else ""
            if _disk_full(e):
                free = shutil.disk_usage(path.parent).free
                raise CheckpointError(f"disk full: cannot write {path} ({free / 2**20:.0f} MiB free){kept}") from e
            raise CheckpointError(f"cannot write {path}: {e}{kept}") from e
        raise
    return path


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once): the permissions a plain ``open`` would give."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or its cause is "no space left" (torch's zip writer reports it as a RuntimeError)."""
    while error is not None:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through ``atomic_write``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_json(data: Any, path: str | Path) -> Path:
    """A JSON file (indented, one trailing newline) through ``atomic_write``."""
    return atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """A ``.safetensors`` file (with ``metadata`` strings in its header) through ``atomic_write``."""
    metadata = {"format": "pt"} | (metadata or {})
    return atomic_write(path, lambda f: f.write(safetensors.torch.save(state, metadata=metadata)))


# diffusers / transformers weight files: each component's file stem (.safetensors; the .bin name differs for "model")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def weight_file(folder: Path, stem: str, variant: str | None = None, what: str = "model") -> Path:
    """A diffusers component's weights in ``folder``: ``.safetensors`` before ``.bin`` (read through the weights-only
    unpickler), the requested variant (e.g. "fp16") first, and a variant file when it is the only one there."""
    bin_stem = "pytorch_model" if stem == "model" else stem
    names = [f"{stem}.{variant}.safetensors", f"{bin_stem}.{variant}.bin"] if variant else []
    names += [f"{stem}.safetensors", f"{bin_stem}.bin"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p.name for p in folder.glob(f"*{stem}*") if p.suffix in (".safetensors", ".bin")) if folder.is_dir() else []
    if len(others) == 1:
        return folder / others[0]
    raise CheckpointError(f"no {what} weights in {folder} (looked for {', '.join(names)}; found {others or 'none'})")


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch checkpoint with ``weights_only=True``: tensors and plain containers only,
    so a malicious file cannot run code. Errors name the file and what is wrong with it."""
    path = _existing_file(path, "checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors …
        _refuse_unsafe(path, _pickle_globals(path))
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, corrupt, or not a weights-only torch file): "
                              f"{_diagnosis(e)}") from e


WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Training metadata that public weight files pickle beside the tensors (Lightning callbacks in the
# original Stable Diffusion .ckpt files, numpy scalars); bound to _Inert, never imported, then dropped.
_INERT_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_INERT_NAMES = {"numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}


class _Inert:
    """Stands in for a harmless class or function named in a pickle: takes any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors in a weight file, on CPU: ``.safetensors``, or a torch pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``).
    ``load_weight_file`` also returns the file's metadata.

    A nested ``state_dict`` (original Stable Diffusion ``.ckpt`` files) is unwrapped; non-tensor entries are dropped.

    Threat model: a pickle is a program, and a downloaded weight file can be written to run one
    (``os.system``, ``exec``) the moment it is unpickled. Pickles therefore only go through torch's
    ``weights_only`` unpickler, which builds tensors and plain containers and calls nothing else. The
    training metadata some public files carry (``_INERT_PREFIXES``, ``_INERT_NAMES``) is bound to an
    inert stand-in, never imported; any other global is refused by name. safetensors holds no code.
    """
    return load_weight_file(path)[0]


def weight_file_keys(path: str | Path) -> list[str]:
    """The tensor names in a weight file: from a safetensors header without reading the tensors (a 7 GB
    checkpoint answers at once), from a pickle by loading it as ``load_state_dict_file`` does."""
    path = _existing_file(path, "weight file")
    if path.suffix.lower() == ".safetensors":
        try:
            with safetensors.safe_open(path, "pt") as f:
                return list(f.keys())
        except Exception as e:
            raise CheckpointError(f"cannot read {path} (truncated or corrupt safetensors file): {e}") from e
    return list(load_state_dict_file(path))


def load_weight_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a weight file, read as ``load_state_dict_file`` does. Metadata: a safetensors
    header's ``__metadata__`` strings, or a pickle's top-level numbers and strings (e.g. ``global_step``)."""
    path = _existing_file(path, "weight file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_FILE_SUFFIXES:
        supported = ", ".join(WEIGHT_FILE_SUFFIXES)
        raise CheckpointError(f"{path}: unknown weight-file extension {suffix!r}; supported: {supported}")
    if suffix == ".safetensors":
        try:
            obj = safetensors.torch.load_file(path, device="cpu")
            with safetensors.safe_open(path, "pt") as f:
                metadata: dict[str, Any] = dict(f.metadata() or {})
        except Exception as e:  # SafetensorError: header too large / too small / file not fully covered …
            raise CheckpointError(f"cannot read {path} (truncated or corrupt safetensors file): {e}") from e
    else:
        obj = _load_pickled_weights(path)
        metadata = {k: v for k, v in obj.items() if isinstance(v, (int, float, str))} if isinstance(obj, dict) else {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    items = obj.items() if isinstance(obj, dict) else ()
    tensors = {k: v for k, v in items if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (it holds a {type(obj).__name__})")
    return tensors, metadata


def _load_pickled_weights(path: Path) -> Any:
    """``torch.load(weights_only=True)``; on refusal, once more with the known-harmless globals bound to ``_Inert``."""
    mmap = zipfile.is_zipfile(path)  # torch maps only its zip format; legacy files are read whole
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        error = e
    names = _pickle_globals(path)
    inert = sorted(n for n in names if n.startswith(_INERT_PREFIXES) or n in _INERT_NAMES)
    _refuse_unsafe(path, names - set(inert))
    if inert:
        try:
            with torch.serialization.safe_globals([(_Inert, name) for name in inert]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            error = e
    raise CheckpointError(f"cannot read {path} (truncated, corrupt, or not a torch weight file): {_diagnosis(error)}") from error


def _refuse_unsafe(path: Path, names: set[str]) -> None:
    """Refuse by name a pickle that calls globals no weight file needs (``os.system``, ``builtins.exec`` …)."""
    # The private table is the one torch.serialization.get_unsafe_globals_in_checkpoint consults.
    refused = sorted(names - set(_weights_only_unpickler._get_allowed_globals()))
    if refused:
        raise CheckpointError(f"refusing to load {path}: its pickle calls {', '.join(refused)}, which no weight file "
                              "needs; the file may be malicious: never load it with torch's safety turned off")


def _diagnosis(error: Exception) -> str:
    """torch's reason for refusing a file, without its advice to retry with the safety turned off."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    return re.split(r"Please use|Check the documentation|In PyTorch 2\.6|weights_only", text)[0].strip().rstrip(".(")


def _pickle_globals(path: Path) -> set[str]:
    """The globals (``module.name``) a torch file's pickle refers to, read by disassembly, never by unpickling.
    Best effort: a damaged file gives the names of the pickles that read through to their end."""
    names: set[str] = set()
    recent: list[Any] = []  # arguments of the last two value-pushing opcodes, for protocol-4 STACK_GLOBAL
    try:
        with path.open("rb") as f:
            stream: Any = f
            if f.read(4) == b"PK\x03\x04":  # torch's zip format: the pickle is the archive's data.pkl
                with zipfile.ZipFile(f) as archive:
                    stream = io.BytesIO(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
            else:
                f.seek(0)
            for _ in range(4):  # a legacy file is four pickles: magic number, protocol, system info, the object
                found = set()  # kept only once the pickle reads through to its end: no names from damaged bytes
                for op, arg, _pos in pickletools.genops(stream):
                    if op.name == "GLOBAL":  # protocol 2 writes Python 2 names (__builtin__.exec); map as torch does
                        module, name = arg.split(" ", 1)
                        found.add(".".join(NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))))
                    elif op.name == "STACK_GLOBAL":
                        found.add(".".join(a if isinstance(a, str) else "?" for a in recent))
                    if op.name not in ("MEMOIZE", "FRAME") and "PUT" not in op.name:
                        recent = [*recent[-1:], arg]
                names |= found
    except Exception:  # EOF after the last pickle, or damage
        pass
    return names


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    return path


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                 assign: bool = False) -> None:
    """``load_state_dict`` that reports missing keys, unexpected keys and shape mismatches by name.

    ``assign`` adopts the given tensors (dtype included) instead of copying into the model's own:
    for models built on the "meta" device, which are never initialised, so loading is fast."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(own[k].shape)} in model"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model ({type(model).__name__}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:8]) + (f", … ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, assign=assign)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON config file of a checkpoint folder, with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
