"""The per-field rules of untrusted input: the contract's patterns, lengths and formats, and the problem
details they report.

Every check reports one ``validationDetail`` per offending field (not just the first), named with the
field's path in the request (``idc``, ``DefaultPartitionTable[0].size``). Patterns are matched with
``fullmatch``: the contract's ``^…$`` anchors mean the whole value, and Python's ``$`` would let a
trailing newline through."""

from __future__ import annotations

import re
import uuid
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from ..schemas import ValidationDetail

# The contract's own patterns (components/schemas/idcName, productName, name), anchors dropped for fullmatch.
IDC_PATTERN = "^[a-zA-Z0-9._-]+$"
PRODUCT_PATTERN = "^[a-zA-Z0-9._-]+$"
NAME_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_\-. ]*)?[A-Za-z0-9]$"
IDC_MAX, PRODUCT_MAX, NAME_MAX = 50, 256, 255

_IDC_RE = re.compile(IDC_PATTERN[1:-1])
_PRODUCT_RE = re.compile(PRODUCT_PATTERN[1:-1])
_NAME_RE = re.compile(NAME_PATTERN[1:-1])
# RFC 3986 absolute URI: a scheme, then only unreserved, reserved and percent-encoded characters.
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_ORIGINAL_VALUE_MAX = 256

_MISSING: Any = object()
T = TypeVar("T")


def original(value: Any) -> str:
    """The offending value as the string `originalValue` must be, bounded so we never echo megabytes."""
    if value is _MISSING or value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = msgspec.json.encode(value).decode()
        except (TypeError, msgspec.EncodeError):
            text = repr(value)
        except RecursionError:  # nested about as deep as the decoder allows: echo its shape, not it
            text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= _ORIGINAL_VALUE_MAX else text[:_ORIGINAL_VALUE_MAX] + "…"


def detail(
    field: str, expression: str, reason: str, value: Any, argument: str | None = None
) -> ValidationDetail:
    return ValidationDetail(
        field=field, expression=expression, reason=reason, originalValue=original(value), argument=argument
    )


def _check_pattern(
    field: str, value: str, regex: re.Pattern[str], pattern: str, max_len: int, out: list[ValidationDetail]
) -> None:
    if len(value) > max_len:
        out.append(detail(field, "max", f"Must be at most {max_len} characters long.", value, str(max_len)))
    elif not regex.fullmatch(value):
        out.append(detail(field, "pattern", f"Must match the pattern {pattern}.", value, pattern))


def parse_uuid(raw: str) -> uuid.UUID | None:
    """A UUID in its canonical 8-4-4-4-12 text form (either case); None for anything else, since
    ``uuid.UUID`` alone also takes braces, URNs and hyphens in odd places."""
    if len(raw) != 36:
        return None
    try:
        value = uuid.UUID(raw)
    except ValueError:
        return None
    return value if str(value) == raw.lower() else None


def is_uri(value: str) -> bool:
    """An absolute URI per RFC 3986; http(s) URIs need a host (RFC 9110 §4.2.1)."""
    if not _URI_RE.fullmatch(value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:  # an unbalanced IPv6 bracket
        return False
    if "#" in parts.fragment or any(
        c in part for c in "[]" for part in (parts.path, parts.query, parts.fragment)
    ):
        return False  # one fragment; brackets only around an IP literal in the authority
    return parts.scheme.lower() not in ("http", "https") or bool(parts.hostname)
