"""The value parsers of settings: numbers and flags within bounds, origins, the root path, rates.

Each is a ``Parser``: called with the variable's name (from its one ``Setting`` in config.py) and the raw
value; a value it cannot use raises ``ConfigError`` naming the variable."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

N = TypeVar("N", int, float)
Parser = Callable[[str, str], Any]  # (variable name, raw value) -> the setting's value


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


@dataclasses.dataclass(frozen=True)
class Bounded(Generic[N]):
    """An ``int`` or ``float`` (``kind``) from ``low`` to ``high``; docs/configuration.md shows the range."""

    kind: Callable[[str], N]
    low: N
    high: N

    def __call__(self, name: str, raw: str) -> N:
        try:
            value = self.kind(raw)
        except ValueError:
            noun = "an integer" if self.kind is int else "a number"
            raise ConfigError(f"{name} must be {noun}, got {raw!r}") from None
        if not self.low <= value <= self.high:
            raise ConfigError(f"{name} must be between {self.low} and {self.high}, got {raw!r}")
        return value


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _origins(name: str, raw: str) -> tuple[str, ...]:
    from .cors import parse_origins

    try:
        return parse_origins(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _root_path(name: str, raw: str) -> str:
    from .prefix import normalize_root_path

    try:
        return normalize_root_path(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _path(name: str, raw: str) -> Path:
    return Path(raw)


def _str(name: str, raw: str) -> str:
    return raw


def _optional_str(name: str, raw: str) -> str | None:
    return raw or None


def _log_format(name: str, raw: str) -> str | None:
    value = raw.strip().lower()
    if value not in ("", "json", "text"):
        raise ConfigError(f"{name} must be json or text (or empty: text on a terminal), got {raw!r}")
    return value or None


def _rate(name: str, raw: str) -> str | None:
    from .ratelimit import Rate

    try:
        return str(Rate.parse(raw))
    except ValueError:
        raise ConfigError(f"{name} must be RATE/BURST (e.g. 100/200), got {raw!r}") from None


INTERFACES = ("rsgi", "asgi")


def _interface(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in INTERFACES:
        raise ConfigError(f"{name} must be rsgi or asgi, got {raw!r}")
    return value
