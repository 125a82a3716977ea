"""New classes for a trained class-conditional UNet: the rows a toy textual-inversion run learns.

Textual inversion  [Gal et al. 2022, Eq. 2] for a model conditioned on class labels: a new "word" is a new row v* of
the class-embedding table (as a one-token context with ``label_context``, or added to the time embedding), learned with
every weight frozen,  v* = argmin_v E ‖ε − ε_θ(x_t, t, v)‖².  ``ldm finetune --method textual-inversion`` on an
``ldm train --class-conditional`` run learns it and writes ``{"class_embedding": (k, D)}``; this module puts such rows
into a UNet to sample the new class. Nothing here trains, so sampling code may import it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weight_file
from .unet import UNet


class ExtendedClassEmbedding(nn.Module):
    """A class-embedding table with k rows added before its null row: labels 0 … n−1 are the old classes,
    n … n+k−1 the new ones, n+k the null label ∅. The rows are kept as given (a Parameter stays trainable).
    Shapes: labels (B,) → (B, D)."""

    def __init__(self, table: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.table = table
        self.set_rows(rows)

    def set_rows(self, rows: torch.Tensor) -> None:
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        n, weight = self.table.num_embeddings - 1, self.table.weight
        return F.embedding(labels, torch.cat([weight[:n], self.rows.to(weight.dtype), weight[n:]]))


def add_class_embedding(unet: UNet, rows: torch.Tensor) -> list[int]:
    """Give a class-conditional UNet k new classes, the rows (k, D) a toy textual-inversion run learned; returns
    their labels n … n+k−1 (the null label becomes n+k). To sample the new class of an ``ldm finetune`` run:
    ``pipe = load_pipeline(BASE); [label] = add_class_embedding(pipe.unet, load_class_embedding(FILE));
    pipe(16, class_label=label)``."""
    table, c = unet.class_embedding, unet.config
    if table is None:
        raise ValueError("this UNet is unconditional: it has no class embedding to add a class to")
    if isinstance(table, ExtendedClassEmbedding):
        raise ValueError("this UNet already has added classes (load the base model again to add others)")
    if rows.dim() != 2 or rows.shape[1] != table.embedding_dim:
        raise ValueError(f"class rows must be (k, {table.embedding_dim}) for this UNet; got {tuple(rows.shape)}")
    unet.class_embedding = ExtendedClassEmbedding(table, rows.to(table.weight.device, table.weight.dtype))
    unet.config = c.with_(num_classes=c.num_classes + len(rows))
    return list(range(c.num_classes, c.num_classes + len(rows)))


def load_class_embedding(path: str | Path) -> torch.Tensor:
    """The new class rows (k, D) a toy textual-inversion run wrote (``{"class_embedding": rows}``)."""
    tensors, _ = load_weight_file(path)
    if "class_embedding" not in tensors:
        raise ValueError(f"{path} holds no class_embedding rows (a toy textual-inversion run's embedding.safetensors)")
    return tensors["class_embedding"]


__all__ = ["ExtendedClassEmbedding", "add_class_embedding", "load_class_embedding"]
