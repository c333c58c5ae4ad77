"""The value parsers of settings: numbers and flags within bounds, origins, the root path, rates. Each
raises ``ConfigError`` naming the variable."""

from __future__ import annotations

from collections.abc import Callable


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


def _float(name: str, low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {raw!r}")
        return value

    return parse


def _int(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {raw!r}")
        return value

    return parse


def _bool(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    return parse


def _origins(raw: str) -> tuple[str, ...]:
    from .cors import parse_origins

    try:
        return parse_origins(raw)
    except ValueError as exc:
        raise ConfigError(f"CE_CORS_ORIGINS: {exc}") from None


def _root_path(raw: str) -> str:
    from .prefix import normalize_root_path

    try:
        return normalize_root_path(raw)
    except ValueError as exc:
        raise ConfigError(f"CE_ROOT_PATH: {exc}") from None


def _optional_str(raw: str) -> str | None:
    return raw or None


def _log_format(raw: str) -> str | None:
    value = raw.strip().lower()
    if value not in ("", "json", "text"):
        raise ConfigError(f"CE_LOG_FORMAT must be json or text (or empty: text on a terminal), got {raw!r}")
    return value or None


def _rate(name: str) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        from .ratelimit import Rate

        try:
            return str(Rate.parse(raw))
        except ValueError:
            raise ConfigError(f"{name} must be RATE/BURST (e.g. 100/200), got {raw!r}") from None

    return parse
