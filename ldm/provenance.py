"""How an image was made, written into the PNG it is saved as and read back from it.

Every PNG ``ldm`` writes carries two text chunks:

- ``parameters``: the "infotext" the common Stable Diffusion UIs write and model sites read::

      a lighthouse at dawn
      Negative prompt: blurry
      Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 0, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

  the prompt, an optional negative prompt, then one line of ``key: value`` pairs, a value holding a comma, colon or
  newline written as a JSON string. "Model hash" is the first 10 hex digits of the SHA-256 of the checkpoint file.
- ``ldm``: JSON with the command's complete settings, ldm's version and the model's full SHA-256, which
  ``ldm txt2img --from-png`` and ``ldm sample --from-png`` read back to make the same image again.

Hashing a 4 GB checkpoint takes seconds, so digests are cached by path, size and modification time
(``$LDM_CACHE/hashes.json``, else ``~/.cache/ldm/hashes.json``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .checkpoint import CheckpointError, atomic_write
from .samplers import ALIASES, resolve_sampler

# A settings chunk larger than this is not one ldm or a UI wrote: refuse it rather than parse it.
MAX_METADATA = 64 * 1024
# What infotext keys mean in ldm's settings, and how to read their values.
INFOTEXT_NUMBERS = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
                    "Clip skip": ("clip_skip", int), "Denoising strength": ("strength", float),
                    "CFG Rescale phi": ("guidance_rescale", float), "Eta": ("eta", float)}
# The schedules UIs name in "Schedule type" (A1111 1.9 and later) or as a suffix of the sampler's name.
SCHEDULE_TYPES = {"karras": "karras", "exponential": "exponential", "beta": "beta", "automatic": None}


class MetadataError(ValueError):
    """A PNG whose settings are missing, too large or unreadable."""


# --- model hashes ---------------------------------------------------------------------------------------------------
def hash_cache_path() -> Path:
    root = Path(os.environ["LDM_CACHE"]).expanduser() if os.environ.get("LDM_CACHE") else Path.home() / ".cache" / "ldm"
    return root / "hashes.json"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, from the cache when its path, size and modification time are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    cache_file = hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):  # none yet, or a damaged one: start a new one
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    try:
        atomic_write(cache_file, lambda f: f.write(json.dumps(cache, indent=0).encode()))
    except (OSError, CheckpointError):  # a read-only home still gets its hash, only not cached
        pass
    return cache[key]["sha256"]


def model_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 that names a model: of the file itself (what the UIs' "Model hash" abbreviates); for a run
    directory, of its ``checkpoint.pt``; for any other folder (diffusers), of the list of its files' relative paths
    and SHA-256s, sorted."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if (path / "checkpoint.pt").is_file():
        return file_sha256(path / "checkpoint.pt")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{path}: no model files to hash")
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


# --- infotext -------------------------------------------------------------------------------------------------------
def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n\"") else text


def sampler_ui_name(sampler: str, sigmas: str | None) -> str:
    """The name UIs give ``sampler`` with ``sigmas`` ("DPM++ 2M Karras"); ldm's key when they have none."""
    key, sigmas = resolve_sampler(sampler, sigmas)
    for alias, target in ALIASES.items():
        if target == (key, sigmas):
            return alias
    return key if sigmas is None else f"{key} {sigmas}"


def infotext(settings: dict[str, Any]) -> str:
    """The ``parameters`` text for ``settings`` (prompt, negative_prompt, steps, sampler, sigmas, guidance_scale,
    seed, width, height, model, model_sha256, and any of clip_skip, strength, guidance_rescale, eta)."""
    lines = [settings.get("prompt") or ""]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {"Steps": settings.get("steps"),
              "Sampler": sampler_ui_name(settings["sampler"], settings.get("sigmas")) if settings.get("sampler") else None,
              "CFG scale": settings.get("guidance_scale"), "Seed": settings.get("seed"),
              "Size": f"{settings['width']}x{settings['height']}" if settings.get("width") else None,
              "Model hash": settings["model_sha256"][:10] if settings.get("model_sha256") else None,
              "Model": settings.get("model"),
              "Clip skip": settings.get("clip_skip") if settings.get("clip_skip", 1) != 1 else None,
              "Denoising strength": settings.get("strength"),
              "CFG Rescale phi": settings.get("guidance_rescale") or None, "Eta": settings.get("eta") or None}
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None) + ", Version: ldm")
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """ldm's settings from a UI's ``parameters`` text: prompt, negative_prompt, steps, sampler (ldm's key),
    sigmas, guidance_scale, seed, width, height, clip_skip, strength, model, model_hash. A sampler ldm does not
    have, or a value that is not a number where one must be, is an error that names it."""
    lines = text.strip("\n").split("\n")
    pairs = dict(_PAIR.findall(lines[-1])) if len(lines[-1]) else {}
    if len(pairs) < 2:  # no parameter line: the whole text is the prompt
        pairs, body = {}, lines
    else:
        body = lines[:-1]
    prompt, negative, into_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    pairs = {k.strip(): json.loads(v) if v.startswith('"') else v.strip() for k, v in pairs.items()}
    settings: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip() or None}
    for key, (name, kind) in INFOTEXT_NUMBERS.items():
        if key in pairs:
            try:
                settings[name] = kind(pairs[key])
            except ValueError:
                raise MetadataError(f"{key}: {pairs[key]!r} is not a number") from None
    if "Size" in pairs:
        match = re.fullmatch(r"(\d+)x(\d+)", pairs["Size"])
        if match is None:
            raise MetadataError(f"Size: {pairs['Size']!r} is not WIDTHxHEIGHT")
        settings["width"], settings["height"] = int(match[1]), int(match[2])
    if "Sampler" in pairs:
        settings["sampler"], settings["sigmas"] = _sampler(pairs["Sampler"], pairs.get("Schedule type"))
    if "Model" in pairs:
        settings["model"] = pairs["Model"]
    if "Model hash" in pairs:
        settings["model_hash"] = pairs["Model hash"]
    return settings


def _sampler(name: str, schedule: str | None) -> tuple[str, str | None]:
    """(ldm's sampler key, σ schedule) for a UI's sampler name and optional "Schedule type"."""
    if schedule is not None and schedule.lower() not in SCHEDULE_TYPES:
        raise MetadataError(f"Schedule type {schedule!r} is not one ldm has; it has: "
                            f"{', '.join(s for s in SCHEDULE_TYPES if s != 'automatic')}")
    sigmas = SCHEDULE_TYPES.get(schedule.lower()) if schedule else None
    try:
        return resolve_sampler(name, sigmas)
    except ValueError:
        raise MetadataError(f"the image was made with sampler {name!r}, which ldm does not have; it has: "
                            f"{', '.join(ALIASES)}") from None


# --- PNG files ------------------------------------------------------------------------------------------------------
def save_png(image: Image.Image, path: str | os.PathLike, settings: dict[str, Any] | None) -> Path:
    """Write ``image`` to ``path`` atomically, with ``settings`` as its ``parameters`` and ``ldm`` chunks (None:
    no metadata)."""
    info = None
    if settings is not None:
        from . import __version__

        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", infotext(settings))
        info.add_itxt("ldm", json.dumps({"ldm_version": __version__, **settings}, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings an image was made with: ldm's own chunk when it has one, else a UI's ``parameters`` text.
    ``source`` says which ("ldm" or "parameters")."""
    try:
        with Image.open(path) as image:
            image.load()
            chunks = dict(getattr(image, "text", {}) or {})
    except (OSError, SyntaxError, ValueError) as e:  # PIL: SyntaxError for broken chunks, ValueError for text bombs
        raise MetadataError(f"{path}: not a readable image ({e})") from None
    for name in ("ldm", "parameters"):
        text = chunks.get(name)
        if text is None:
            continue
        if not isinstance(text, str) or len(text) > MAX_METADATA:
            raise MetadataError(f"{path}: its {name!r} text is {len(text):,} characters, more than settings take "
                                f"({MAX_METADATA:,}); refused")
        if name == "ldm":
            try:
                settings = json.loads(text)
            except ValueError as e:
                raise MetadataError(f"{path}: its 'ldm' settings are not valid JSON ({e})") from None
            if not isinstance(settings, dict):
                raise MetadataError(f"{path}: its 'ldm' settings are not a JSON object")
            return {**settings, "source": "ldm"}
        return {**parse_infotext(text), "source": "parameters"}
    raise MetadataError(f"{path}: no generation settings in it (no 'parameters' or 'ldm' text chunk)")
