"""Textual-inversion embeddings: the files people share, read, written and added to a pipeline's text encoders.

Textual inversion  [Gal et al. 2022, "An Image is Worth One Word", §3]: a new pseudo-word S* gets a new row v* of
the text encoder's token-embedding table, learned with everything else frozen,

    v* = argmin_v  E_{z, y, ε, t} ‖ε − ε_θ(z_t, t, c_θ(y))‖²      (y a caption containing S*, embedded as v)
                                                                 [Gal et al. 2022, Eq. 2]
so the file is just that row — or n rows, one per vector, when S* stands for n tokens — per text encoder:

    A1111 ``.pt``               {"string_to_param": {"*": (n, D)}, "name", "step", …}
    kohya ``.safetensors``      {"emb_params": (n, D)}
    diffusers ``learned_embeds.bin`` / ``.safetensors``   {token: (D,) or (n, D)}
    SDXL ``.safetensors``       {"clip_l": (n, 768), "clip_g": (n, 1280)}   (both encoders)

    file ─read_embedding─► Embedding ─add_embedding─► tokenizer.add_token (ids V … V+n−1)
                                                     + text_encoder.set_extra_embeddings (rows V … V+n−1)

Pickles (``.pt``, ``.bin``) are read only through ``checkpoint.safe_load``, torch's weights-only unpickler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from .checkpoint import CheckpointError, atomic_save_safetensors, load_state_dict_file, safe_load
from .text_encoder import TextEncoder
from .tokenizer import CLIPTokenizer

Format = Literal["a1111", "kohya", "diffusers", "sdxl", "tensor"]
SDXL_KEYS = ("clip_l", "clip_g")
TEXT = "text"  # the key of a one-encoder (SD 1 / SD 2) embedding's vectors
# The CLIP widths each family's text encoder has: how a file that names no family is placed.
FAMILY_WIDTHS = {768: "sd1", 1024: "sd2"}
FAMILY_NAMES = {"sd1": "SD 1", "sd2": "SD 2", "sdxl": "SDXL"}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")  # in a diffusers concept's folder


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding as read from a file.

    vectors: per text encoder, (n, D): {"text": …} for SD 1 / SD 2, {"clip_l": …, "clip_g": …} for SDXL
        (clip_l → the pipeline's ``text_encoder``, clip_g → ``text_encoder_2``).
    name: the token it is used by unless given another: the file's stem (A1111's rule), or the token a
        diffusers file carries.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    format: Format
    path: Path | None = None
    step: int | None = None  # A1111's training step, when the file says

    @property
    def vectors_per_token(self) -> int:
        """n: how many tokens the word S* takes in a prompt."""
        return len(next(iter(self.vectors.values())))

    @property
    def sdxl(self) -> bool:
        return TEXT not in self.vectors

    @property
    def family(self) -> str | None:
        """"sdxl" for clip_l + clip_g, else a guess from the width: "sd1" (768), "sd2" (1024), None otherwise."""
        return "sdxl" if self.sdxl else FAMILY_WIDTHS.get(self.vectors[TEXT].shape[1])


def read_embedding(path: str | Path) -> Embedding:
    """An embedding file in any of the formats above (``ldm.embeddings``), on the CPU in its own dtype; a folder
    (a diffusers concept) is read through its ``learned_embeds.safetensors`` or ``learned_embeds.bin``.

    CheckpointError naming the file when it cannot be read (truncated, corrupt, a pickle that would run code);
    ValueError naming it when it holds no embedding in a known layout."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in DIFFUSERS_NAMES if (path / name).is_file()), path / DIFFUSERS_NAMES[-1])
    if path.suffix.lower() == ".safetensors":
        data: Any = load_state_dict_file(path)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        data = safe_load(path)
    else:
        raise CheckpointError(f"{path}: unknown embedding-file extension {path.suffix!r}; supported: .safetensors, "
                              f"{', '.join(PICKLE_SUFFIXES)}")
    name, vectors, fmt = _interpret(path, data)
    vectors = {key: _rows(path, key, value) for key, value in vectors.items()}
    if len({len(v) for v in vectors.values()}) > 1:
        counts = ", ".join(f"{k}: {len(v)}" for k, v in vectors.items())
        raise ValueError(f"{path}: its encoders' vector counts differ ({counts})")
    step = data.get("step") if isinstance(data, dict) and isinstance(data.get("step"), int) else None
    return Embedding(name, vectors, fmt, path, step)


def _interpret(path: Path, data: Any) -> tuple[str, dict[str, Any], Format]:
    """(default token, vectors per encoder, format) of a loaded file, by its keys (as A1111 and diffusers tell)."""
    if isinstance(data, torch.Tensor):  # a bare tensor, torch.save(vectors)
        return path.stem, {TEXT: data}, "tensor"
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{path}: an A1111 embedding's string_to_param must hold one tensor (under '*')")
        return path.stem, {TEXT: next(iter(params.values()))}, "a1111"
    if all(key in data for key in SDXL_KEYS):
        return path.stem, {key: data[key] for key in SDXL_KEYS}, "sdxl"
    if "emb_params" in data:
        return path.stem, {TEXT: data["emb_params"]}, "kohya"
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        token, value = next(iter(tensors.items()))
        return str(token), {TEXT: value}, "diffusers"
    raise ValueError(f"{path} is not an embedding in a known layout (A1111 string_to_param, kohya emb_params, "
                     f"SDXL clip_l + clip_g, or one diffusers {{token: tensor}}); its keys: {sorted(map(str, data))[:8]}")


def _rows(path: Path, key: str, value: Any) -> torch.Tensor:
    """A (D,) or (n, D) floating tensor as (n, D), detached."""
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.dim() not in (1, 2) \
            or not value.numel():
        kind = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{path}: {key} must be a (D,) or (n, D) float tensor; got {kind}")
    return value.detach().reshape(-1, value.shape[-1])


def describe_embedding(path: str | Path) -> dict[str, Any]:
    """What an embedding file holds, for ``ldm inspect``: format, default token, vectors per token, width per
    encoder, the family it fits (guessed from the widths: 768 → SD 1, 1024 → SD 2, clip_l 768 + clip_g 1280 →
    SDXL; None when the width is none of these) and A1111's training step when the file has it."""
    e = read_embedding(path)
    widths = {key: v.shape[1] for key, v in e.vectors.items()}
    family = e.family
    if e.sdxl and widths != {"clip_l": 768, "clip_g": 1280}:
        family = None  # SDXL's layout, but not SDXL's encoders
    return {"path": str(e.path), "format": e.format, "token": e.name, "vectors_per_token": e.vectors_per_token,
            "widths": widths, "family": family, "family_name": FAMILY_NAMES.get(family), "step": e.step}


def looks_like_embedding(path: str | Path) -> bool:
    """Whether ``path`` reads as an embedding file (``read_embedding`` succeeds); big files are not opened:
    an embedding is a few kilobytes."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size > 2**24:
        return False
    try:
        read_embedding(path)
    except (CheckpointError, ValueError, OSError):
        return False
    return True


def save_embedding(path: str | Path, vectors: torch.Tensor | Mapping[str, torch.Tensor]) -> Path:
    """Write an embedding as A1111 and diffusers both read it: ``.safetensors`` holding {"emb_params": (n, D)}
    for a (n, D) or (D,) tensor (SD 1 / SD 2), or {"clip_l": (n, 768), "clip_g": (n, 1280)} for a mapping with
    those two keys (SDXL). The file's stem is the token it loads as. Atomic (``checkpoint.atomic_write``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: embeddings are written as .safetensors (A1111 and diffusers read it)")
    if isinstance(vectors, torch.Tensor):
        state = {"emb_params": vectors}
    elif set(vectors) == set(SDXL_KEYS):
        state = dict(vectors)
    else:
        raise ValueError(f"save_embedding takes a (n, D) tensor or a mapping with {' and '.join(SDXL_KEYS)}; "
                         f"got keys {sorted(vectors)}")
    state = {key: _rows(path, key, value).float().cpu().contiguous() for key, value in state.items()}
    if len({len(v) for v in state.values()}) > 1:
        raise ValueError(f"{path}: clip_l and clip_g must have as many vectors each; got "
                         f"{[len(v) for v in state.values()]}")
    return atomic_save_safetensors(state, path)


Encoders = Mapping[str, tuple[CLIPTokenizer | None, TextEncoder | None]]


def add_embedding(embedding: Embedding, encoders: Encoders, family: str, token: str | None = None) -> list[str]:
    """Add ``embedding`` to a pipeline's ``{"text_encoder": (tokenizer, encoder), "text_encoder_2": …}`` (None
    where it has none) under ``token`` (default: the embedding's name): each tokenizer gets the new word (n ids,
    ``CLIPTokenizer.add_token``), each encoder the vectors as the rows for those ids. Returns the token names a
    prompt can use: ``[token, token_1, …, token_{n−1}]``.

    Everything is checked before anything changes: the embedding's family against the pipeline's (``family``
    names it), its widths against the encoders', the token against each vocabulary. ValueError otherwise.
    """
    token = embedding.name if token is None else token
    where = embedding.path or "the embedding"
    targets = _targets(embedding, encoders, family)
    for name, (tokenizer, encoder, rows) in targets.items():
        if rows.shape[1] != encoder.config.width:
            guess = FAMILY_NAMES.get(FAMILY_WIDTHS.get(rows.shape[1]), "no family's")
            raise ValueError(f"{where}: its vectors are {rows.shape[1]} wide ({guess} width), but {name} (the "
                             f"{family} pipeline's) is {encoder.config.width} wide")
        if len(tokenizer) != encoder.num_tokens:
            raise ValueError(f"{name}'s tokenizer reads {len(tokenizer)} ids but the encoder holds {encoder.num_tokens}"
                             " rows: tokens were added to one and not the other")
        tokenizer.check_new_token(token, len(rows))
    for _, encoder, rows in targets.values():
        weight = encoder.token_embedding.weight
        rows = rows.to(weight.device, weight.dtype)
        old = encoder.extra_embeddings
        encoder.set_extra_embeddings(rows if old is None else torch.cat([old.detach(), rows]))
    # once per tokenizer: a pipeline may share one between its encoders, whose rows then take the same ids
    for tokenizer in {id(t): t for t, _, _ in targets.values()}.values():
        tokenizer.add_token(token, embedding.vectors_per_token)
    return [token] + [f"{token}_{i}" for i in range(1, embedding.vectors_per_token)]


def _targets(embedding: Embedding, encoders: Encoders,
             family: str) -> dict[str, tuple[CLIPTokenizer, TextEncoder, torch.Tensor]]:
    """{encoder name: (tokenizer, encoder, rows)}: clip_l → text_encoder, clip_g → text_encoder_2 (SDXL; the
    refiner has only the second), an SD 1 / SD 2 file's vectors → text_encoder of a one-encoder pipeline."""
    sdxl_pipeline = encoders.get("text_encoder_2", (None, None))[1] is not None
    if embedding.sdxl != sdxl_pipeline:
        what = f"an {FAMILY_NAMES['sdxl']} embedding (clip_l + clip_g)" if embedding.sdxl else \
            f"an {FAMILY_NAMES.get(embedding.family, 'SD 1 / SD 2')} embedding (one text encoder's vectors)"
        needs = "an SDXL embedding (clip_l + clip_g)" if sdxl_pipeline else "an SD 1 / SD 2 embedding"
        raise ValueError(f"{embedding.path or 'the embedding'} is {what}; the {family} pipeline needs {needs}")
    keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"} if embedding.sdxl else {"text_encoder": TEXT}
    return {name: (encoders[name][0], encoders[name][1], embedding.vectors[key]) for name, key in keys.items()
            if encoders.get(name, (None, None))[1] is not None}


def remove_embeddings(encoders: Encoders) -> None:
    """Forget every added token and its rows (``StableDiffusion.unload_embeddings``)."""
    for tokenizer, encoder in encoders.values():
        if encoder is not None:
            tokenizer.remove_added_tokens()
            encoder.set_extra_embeddings(None)


__all__ = ["Embedding", "add_embedding", "describe_embedding", "looks_like_embedding", "read_embedding",
           "remove_embeddings",
           "save_embedding"]
