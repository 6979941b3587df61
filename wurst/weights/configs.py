"""Model and pipeline configs from the hub's JSON files: frozen dataclasses, each field's type checked."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from wurst.errors import ConfigError, ModelNotFoundError
from wurst.files import read_bounded

ConfigT = TypeVar("ConfigT")


# The most a config, tokenizer or index file of a model may hold (CLIP's tokenizer.json is 2.2 MB), so that a
# damaged one, or a link to /dev/zero, is refused before it is read.
JSON_LIMIT = 16 * 2**20


def read_text(path: Path, limit: int = JSON_LIMIT) -> str:
    """The UTF-8 text of `path`, a regular file of at most `limit` bytes (wurst.files.read_bounded); anything else
    is one line naming it."""
    try:
        return read_bounded(path, limit).decode("utf-8")
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"missing file: {path}") from e
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start})") from e


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (see read_text)."""
    text = read_text(path)
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
