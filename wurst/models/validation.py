"""Bounds a config checks in its __post_init__: one line naming the field, as ConfigError."""

from __future__ import annotations

import math

from wurst.errors import ConfigError


def require_positive(config, *fields: str) -> None:
    """Config bounds, from a dataclass's __post_init__: each field (an int, or a tuple of ints) is positive."""
    for field in fields:
        value = getattr(config, field)
        if any(v <= 0 for v in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(f"the field '{field}' must be positive, got {value!r}")


def require_finite(config, *fields: str, minimum: float | None = None) -> None:
    """Each float field is finite (and at least `minimum`, when given)."""
    for field in fields:
        value = getattr(config, field)
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = f" and at least {minimum}" if minimum is not None else ""
            raise ConfigError(f"the field '{field}' must be finite{bound}, got {value!r}")


def require_heads_divide(width_field: str, width: int, heads_field: str, heads: int) -> None:
    if heads <= 0 or width % heads:
        raise ConfigError(f"the field '{heads_field}' ({heads}) must be a positive divisor of "
                          f"'{width_field}' ({width})")


def check_r_width(c_r: int) -> None:
    """The r-embedding spaces its frequencies by half - 1, so it needs two sine-cosine pairs at least."""
    if c_r < 4:
        raise ConfigError(f"the field 'c_r' must be at least 4, got {c_r}")
