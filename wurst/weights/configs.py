"""Model and pipeline configs from the hub's JSON files: frozen dataclasses, each field's type checked."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from wurst.errors import ConfigError, ModelNotFoundError

ConfigT = TypeVar("ConfigT")


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"missing file: {path}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type (int, float, bool, str, or a tuple of those)."""
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if hint in (bool, str) else True


def config_from_dict(cls: type[ConfigT], data: Mapping[str, Any], source: str) -> ConfigT:
    """Build the frozen dataclass `cls` from a hub config dict, checking each field's type; unknown keys
    are ignored."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name in data:
            value, hint = data[field.name], hints[field.name]
            if not _has_type(value, hint):
                item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
                kind = f"a list of {item.__name__}" if item else f"a JSON {hint.__name__}"
                raise ConfigError(f"{source}: the field '{field.name}' must be {kind}, got {value!r}")
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source} lacks the field '{field.name}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # ConfigError included: a field out of range or inconsistent
        raise ConfigError(f"{source}: {e}") from e


def read_config(cls: type[ConfigT], path: Path) -> ConfigT:
    return config_from_dict(cls, read_json(path), str(path))
