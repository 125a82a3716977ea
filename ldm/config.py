"""Frozen-dataclass configs ↔ JSON and ↔ command-line strings, for every config in ldm."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from a dict (e.g. parsed JSON); lists become tuples, unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def parse_value(cls: type, name: str, text: str) -> Any:
    """Parse a command-line string for field ``name`` of ``cls`` according to its type annotation.

    Tuples take comma-separated items ("1,2,2"); booleans take true/false/1/0/yes/no;
    Optional fields take "none".
    """
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ValueError(f"unknown {cls.__name__} field {name!r}; known: {', '.join(sorted(hints))}")
    return _parse(hints[name], text, name)


def parse_bool(text: str, name: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case)."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} expects a boolean (true or false), got {text!r}")


def _parse(hint: Any, text: str, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(inner[0], text, name)
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_parse(item, part.strip(), name) for part in text.split(",") if part.strip())
    if origin is typing.Literal:
        if text not in args:
            raise ValueError(f"{name} must be one of {', '.join(map(str, args))}; got {text!r}")
        return text
    if hint is bool:
        return parse_bool(text, name)
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{name} expects {hint.__name__}, got {text!r}") from None
    raise TypeError(f"cannot parse field {name} of type {hint}")
