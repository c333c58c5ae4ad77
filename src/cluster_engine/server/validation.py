"""Validation of the list query's parameters and cursors, and of path ids, with the per-field rules of
``rules.fields`` (re-exported here for the server's modules). Request bodies are read in ``bodies``,
catalog entries in ``rules.catalog_entries``, with the same rules; each raises ``RequestInvalid`` (400)
with one ``validationDetail`` per offending field."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from ..rules.fields import _IDC_RE as _IDC_RE
from ..rules.fields import _NAME_RE as _NAME_RE
from ..rules.fields import _ORIGINAL_VALUE_MAX as _ORIGINAL_VALUE_MAX
from ..rules.fields import _PRODUCT_RE as _PRODUCT_RE
from ..rules.fields import IDC_MAX as IDC_MAX
from ..rules.fields import IDC_PATTERN as IDC_PATTERN
from ..rules.fields import NAME_MAX as NAME_MAX
from ..rules.fields import NAME_PATTERN as NAME_PATTERN
from ..rules.fields import PRODUCT_MAX as PRODUCT_MAX
from ..rules.fields import PRODUCT_PATTERN as PRODUCT_PATTERN
from ..rules.fields import _check_pattern
from ..rules.fields import detail as detail
from ..rules.fields import is_uri as is_uri
from ..rules.fields import original as original
from ..rules.fields import parse_uuid as parse_uuid
from ..schemas import ValidationDetail
from .errors import RequestInvalid

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


def image_id(raw: str) -> uuid.UUID:
    """Validate an image id from a path: a UUID in its canonical textual form (any case)."""
    value = parse_uuid(raw)
    if value is None:
        raise RequestInvalid([detail("id", "uuid", "Must be a UUID.", raw)])
    return value
