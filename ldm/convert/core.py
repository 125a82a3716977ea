"""Renaming weights between ldm and other layouts, by short rule tables.

A ``Layout`` says how each of ldm's parameter names is spelled in another format: a list of
``(regex, replacement)`` rules applied in order with ``re.sub`` (a replacement may be a function
of the match, for index arithmetic). Tables run in one direction only, ldm → foreign: that
direction is a function (every ldm name has exactly one foreign spelling), so the way back is the
same table inverted over the model's own names. Export and import therefore can never disagree,
and every foreign key is either claimed by exactly one ldm parameter or reported as unexpected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_weights

Replacement = Union[str, Callable[[re.Match], str]]
Rule = tuple[str, Replacement]


def rename(key: str, rules: Sequence[Rule]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


@dataclass(frozen=True)
class Layout:
    """How one ldm model's weights are named in another format.

    rules:   ldm name → foreign name.
    aliases: foreign spellings normalised before lookup (older files of the same format).
    ignore:  regexes of foreign keys that hold no weights of ours (buffers such as ``position_ids``).
    conv:    regex of foreign names stored as 1×1 convolutions [C, C, 1, 1] where ldm has linear [C, C].
    """

    rules: Sequence[Rule]
    aliases: Sequence[Rule] = ()
    ignore: Sequence[str] = ()
    conv: str | None = None
    prefix: str = ""

    def with_prefix(self, prefix: str) -> "Layout":
        return Layout(self.rules, self.aliases, self.ignore, self.conv, prefix + self.prefix)

    def name(self, key: str) -> str:
        return self.prefix + rename(key, self.rules)


def foreign_names(model: nn.Module, layout: Layout) -> dict[str, str]:
    """ldm parameter name → its name in ``layout``; refuses a table that maps two names to one."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in model.state_dict():
        new = layout.name(key)
        if new in seen:
            raise ValueError(f"{seen[new]!r} and {key!r} both map to {new!r}: a rule table is wrong")
        names[key], seen[new] = new, key
    return names


def export_state_dict(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """The model's weights under the foreign names (1×1 convs where the format keeps them)."""
    names = foreign_names(model, layout)
    out = {}
    for key, value in model.state_dict().items():
        name = names[key]
        if layout.conv and value.dim() == 2 and re.search(layout.conv, name):
            value = value[:, :, None, None]
        out[name] = value
    return out


def import_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], layout: Layout,
                      source: str = "checkpoint", assign: bool = False) -> nn.Module:
    """Load foreign-named weights into ``model``: every key must be claimed and every shape must match.

    Keys outside ``layout.prefix`` are not looked at (a single file holds several models);
    unexpected keys are reported under their foreign names, missing ones under ldm's.
    """
    wanted = {foreign: key for key, foreign in foreign_names(model, layout).items()}
    own = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, value in state_dict.items():
        if not name.startswith(layout.prefix):
            continue
        name = layout.prefix + rename(name[len(layout.prefix):], layout.aliases)
        if any(re.search(p, name) for p in layout.ignore):
            continue
        key = wanted.get(name)
        if key is None:
            unexpected.append(name)
            continue
        target = own[key]
        if target.shape != value.shape and target.numel() == value.numel() and {target.dim(), value.dim()} == {2, 4}:
            value = value.reshape(target.shape)  # [C, C, 1, 1] conv ↔ [C, C] linear
        converted[key] = value
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f", … ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
        raise CheckpointError(f"{source} has weights that {type(model).__name__} does not know: {shown}")
    load_weights(model, converted, source=source, assign=assign)
    return model


__all__ = ["Layout", "Rule", "export_state_dict", "foreign_names", "import_state_dict", "rename"]
