"""Validation of untrusted input against the contract's patterns, lengths, enums and formats: the per-field
rules, the list query's parameters and cursors, path ids. Request bodies are read in ``bodies``, catalog
entries in ``catalog_entries``, with these rules.

Every check reports one ``validationDetail`` per offending field (not just the first), named with the
field's path in the request (``idc``, ``DefaultPartitionTable[0].size``). Patterns are matched with
``fullmatch``: the contract's ``^…$`` anchors mean the whole value, and Python's ``$`` would let a
trailing newline through."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from ..schemas import ValidationDetail
from .errors import RequestInvalid

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


LIMIT_MAX = 1000
_CURSOR_KEY_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


@dataclass(frozen=True, slots=True)
class ListQuery:
    idc: str | None
    product: str | None
    limit: int | None = None  # opt-in pagination: at most this many images per page
    after: tuple[str, str] | None = None  # the sort key (createdAt, id) the page starts after


def encode_cursor(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(f"{key[0]}|{key[1]}".encode()).decode().rstrip("=")


def _decode_cursor(raw: str) -> tuple[str, str] | None:
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    if not _CURSOR_KEY_RE.fullmatch(text):
        return None
    created, image = text.split("|")
    return created, image


def _single(name: str, params: Mapping[str, list[str]], problems: list[ValidationDetail]) -> str | None:
    given = params.get(name)
    if not given:
        return None
    if len(given) > 1:
        problems.append(detail(name, "single", "This parameter may be given at most once.", given))
        return None
    return given[0]


def _page(
    params: Mapping[str, list[str]], problems: list[ValidationDetail]
) -> tuple[int | None, tuple[str, str] | None]:
    limit: int | None = None
    raw_limit = _single("limit", params, problems)
    if raw_limit is not None:
        if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4) or not (
            1 <= int(raw_limit) <= LIMIT_MAX
        ):
            problems.append(
                detail(
                    "limit",
                    "range",
                    f"Must be an integer from 1 to {LIMIT_MAX}.",
                    raw_limit,
                    f"1-{LIMIT_MAX}",
                )
            )
        else:
            limit = int(raw_limit)
    after = None
    raw_cursor = _single("cursor", params, problems)
    if raw_cursor is not None:
        after = _decode_cursor(raw_cursor)
        if after is None:
            problems.append(
                detail("cursor", "cursor", "Must be a cursor from a previous page's Link header.", raw_cursor)
            )
    return limit, after


def list_query(params: Mapping[str, list[str]]) -> ListQuery:
    """Validate ``GET /v1/images`` query parameters (unknown parameters are ignored)."""
    problems: list[ValidationDetail] = []
    values: dict[str, str | None] = {}
    for name, regex, pattern, max_len in (
        ("idc", _IDC_RE, IDC_PATTERN, IDC_MAX),
        ("product", _PRODUCT_RE, PRODUCT_PATTERN, PRODUCT_MAX),
    ):
        given = params.get(name)
        if not given:
            values[name] = None
            continue
        if len(given) > 1:
            problems.append(detail(name, "single", "This parameter may be given at most once.", given))
            continue
        _check_pattern(name, given[0], regex, pattern, max_len, problems)
        values[name] = given[0]
    limit, after = _page(params, problems)
    if problems:
        raise RequestInvalid(problems)
    return ListQuery(idc=values["idc"], product=values["product"], limit=limit, after=after)


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


def image_id(raw: str) -> uuid.UUID:
    """Validate an image id from a path: a UUID in its canonical textual form (any case)."""
    value = parse_uuid(raw)
    if value is None:
        raise RequestInvalid([detail("id", "uuid", "Must be a UUID.", raw)])
    return value
