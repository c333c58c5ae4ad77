"""An ``ImageCreateReq`` read from decoded JSON or YAML field by field, every problem reported (``_Fields``
reads one field: a string with its pattern, a uuid, an enum, a URI, a datetime, partitions, products).
Shared by request bodies (server/bodies.py) and catalog entries (rules/catalog_entries.py)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec

from ..schemas import ImageBootMode, ImageCreateReq, ImageType, Partition, ValidationDetail
from .fields import (
    _IDC_RE,
    _MISSING,
    _NAME_RE,
    _PRODUCT_RE,
    IDC_MAX,
    IDC_PATTERN,
    NAME_MAX,
    NAME_PATTERN,
    PRODUCT_MAX,
    PRODUCT_PATTERN,
    _check_pattern,
    detail,
    is_uri,
    parse_uuid,
)


class _Fields:
    """Collects the problems of one object while its fields are read."""

    def __init__(self, data: Mapping[str, Any], prefix: str, out: list[ValidationDetail]) -> None:
        self.data, self.prefix, self.out = data, prefix, out

    def path(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def string(
        self,
        name: str,
        *,
        required: bool = True,
        min_len: int = 0,
        max_len: int | None = None,
        regex: re.Pattern[str] | None = None,
        pattern: str = "",
    ) -> str | None:
        value = self.data.get(name, _MISSING)
        field = self.path(name)
        if value is _MISSING or value is None:
            if required:
                self.out.append(detail(field, "required", "This field is required.", value))
            return None
        if not isinstance(value, str):
            self.out.append(detail(field, "type", "Must be a string.", value, "string"))
            return None
        if "\x00" in value:
            self.out.append(detail(field, "printable", "Must not contain NUL characters.", value))
            return None
        if len(value) < min_len:
            self.out.append(
                detail(
                    field,
                    "required" if min_len == 1 else "min",
                    "This field is required."
                    if min_len == 1
                    else f"Must be at least {min_len} characters long.",
                    value,
                    None if min_len == 1 else str(min_len),
                )
            )
            return None
        if max_len is not None and len(value) > max_len:
            self.out.append(
                detail(field, "max", f"Must be at most {max_len} characters long.", value, str(max_len))
            )
            return None
        if regex is not None and not regex.fullmatch(value):
            self.out.append(detail(field, "pattern", f"Must match the pattern {pattern}.", value, pattern))
            return None
        return value

    def uuid(self, name: str, *, required: bool = True) -> uuid.UUID | None:
        value = self.string(name, required=required)
        if value is None:
            return None
        parsed = parse_uuid(value)
        if parsed is None:
            self.out.append(detail(self.path(name), "uuid", "Must be a UUID.", value))
        return parsed

    def enum(
        self, name: str, choices: type[ImageBootMode] | type[ImageType], *, required: bool = True
    ) -> Any:
        value = self.string(name, required=required)
        if value is None:
            return None
        try:
            return choices(value)
        except ValueError:
            allowed = " ".join(member.value for member in choices)
            self.out.append(detail(self.path(name), "oneof", f"Must be one of: {allowed}.", value, allowed))
            return None

    def uri(self, name: str) -> str | None:
        value = self.string(name)
        if value is not None and not is_uri(value):
            self.out.append(detail(self.path(name), "uri", "Must be an absolute URI.", value))
            return None
        return value

    def datetime(self, name: str) -> dt.datetime | None:
        value = self.data.get(name, _MISSING)
        if value is _MISSING or value is None:
            return None
        if isinstance(value, dt.datetime):  # YAML loaders produce datetimes themselves
            parsed: dt.datetime | None = value
        else:
            try:
                parsed = msgspec.convert(value, dt.datetime)
            except msgspec.ValidationError:
                parsed = None
        if parsed is None or parsed.tzinfo is None:
            self.out.append(
                detail(self.path(name), "datetime", "Must be an RFC 3339 date-time with offset.", value)
            )
            return None
        return parsed.astimezone(dt.UTC)

    def array(self, name: str, *, min_items: int = 0) -> list[Any] | None:
        value = self.data.get(name, _MISSING)
        field = self.path(name)
        if value is _MISSING or value is None:
            self.out.append(detail(field, "required", "This field is required.", value))
            return None
        if not isinstance(value, list):
            self.out.append(detail(field, "type", "Must be an array.", value, "array"))
            return None
        if len(value) < min_items:
            self.out.append(
                detail(field, "min", f"Must have at least {min_items} item(s).", value, str(min_items))
            )
            return None
        return value


def _partitions(fields: _Fields) -> list[Partition] | None:
    items = fields.array("DefaultPartitionTable", min_items=1)
    if items is None:
        return None
    partitions: list[Partition] = []
    before = len(fields.out)
    for index, item in enumerate(items):
        prefix = fields.path(f"DefaultPartitionTable[{index}].")
        if not isinstance(item, dict):
            fields.out.append(detail(prefix[:-1], "type", "Must be an object.", item, "object"))
            continue
        part = _Fields(item, prefix, fields.out)
        name = part.string("name", max_len=NAME_MAX, regex=_NAME_RE, pattern=NAME_PATTERN)
        mount = part.string("mountPoint", min_len=1, max_len=1024)
        size = part.string("size", min_len=1, max_len=256)
        fs = part.string("fileSystem", min_len=1, max_len=256)
        if name is not None and mount is not None and size is not None and fs is not None:
            partitions.append(Partition(name=name, mountPoint=mount, size=size, fileSystem=fs))
    return partitions if len(fields.out) == before else None


def _products(fields: _Fields) -> list[str] | None:
    items = fields.array("supportedProducts")
    if items is None:
        return None
    before = len(fields.out)
    for index, item in enumerate(items):
        field = fields.path(f"supportedProducts[{index}]")
        if not isinstance(item, str):
            fields.out.append(detail(field, "type", "Must be a string.", item, "string"))
        elif "\x00" in item:
            fields.out.append(detail(field, "printable", "Must not contain NUL characters.", item))
        else:
            _check_pattern(field, item, _PRODUCT_RE, PRODUCT_PATTERN, PRODUCT_MAX, fields.out)
    # Duplicates carry no meaning for membership; keep the first occurrence of each, in order.
    return list(dict.fromkeys(items)) if len(fields.out) == before else None


def read_image_create(data: Any, out: list[ValidationDetail], prefix: str = "") -> ImageCreateReq | None:
    """Read an ``ImageCreateReq`` from decoded JSON/YAML, appending every problem to ``out``."""
    if not isinstance(data, dict):
        out.append(detail(prefix.rstrip(".") or "body", "type", "Must be a JSON object.", data, "object"))
        return None
    fields = _Fields(data, prefix, out)
    before = len(out)
    values = {
        "idc": fields.string("idc", max_len=IDC_MAX, regex=_IDC_RE, pattern=IDC_PATTERN),
        "orgId": fields.uuid("orgId"),
        "path": fields.string("path"),
        "name": fields.string("name", max_len=NAME_MAX, regex=_NAME_RE, pattern=NAME_PATTERN),
        "OSSeries": fields.string("OSSeries"),
        "OSVersion": fields.string("OSVersion"),
        "OSArchitecture": fields.string("OSArchitecture"),
        "BootMode": fields.enum("BootMode", ImageBootMode),
        "SystemDiskSize": fields.string("SystemDiskSize"),
        "DefaultPartitionTable": _partitions(fields),
        "icon": fields.uri("icon"),
        "supportedProducts": _products(fields),
    }
    if len(out) != before:
        return None
    return ImageCreateReq(**values)
