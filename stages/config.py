"""Building the stages' frozen config dataclasses from plain mappings (the YAML config's sections)."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``mapping``: unknown keys are an error naming the key;
    missing keys take the dataclass default; nested dataclass fields are built recursively;
    lists become tuples so that the result is hashable and frozen."""
    mapping = dict(mapping or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _convert(hints[name], value, f"{where or cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_mapping(hint, value, where=where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                return from_mapping(arg, value, where=where)
    if isinstance(value, list):
        return tuple(_convert(Any, v, where) for v in value)
    return value


def resolve_model_path(spec: str) -> str:
    """Resolve a model reference to what ``from_pretrained`` takes.

    ``python:<module>`` names a model shipped inside an installed Python package (the module's
    ``MODEL_DIR``); anything else (hub id or folder) is returned unchanged.
    """
    if spec.startswith("python:"):
        module_name = spec.removeprefix("python:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"model {spec!r}: cannot import {module_name!r} ({exc})") from None
        model_dir = getattr(module, "MODEL_DIR", None)
        if model_dir is None or not Path(model_dir).is_dir():
            raise ConfigError(f"model {spec!r}: module {module_name!r} ships no MODEL_DIR folder")
        return str(model_dir)
    return spec
