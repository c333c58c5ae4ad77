"""Validation of untrusted input against the contract's patterns, lengths, enums and formats.

Every check reports one ``validationDetail`` per offending field (not just the first), named with the
field's path in the request (``idc``, ``DefaultPartitionTable[0].size``). Patterns are matched with
``fullmatch``: the contract's ``^…$`` anchors mean the whole value, and Python's ``$`` would let a
trailing newline through.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from ..schemas import ImageBootMode, ImageCreateReq, ImageType, Partition, ValidationDetail
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


# ---------------------------------------------------------------------------------------------- queries


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


# ---------------------------------------------------------------------------------------------- bodies


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


class CatalogEntry(msgspec.Struct, frozen=True):
    """One entry of a catalog file: an ImageCreateReq plus optional type, id and createdAt."""

    spec: ImageCreateReq
    type: ImageType
    id: uuid.UUID | None
    created_at: dt.datetime | None


# The fast path of a catalog entry: msgspec checks the types and builds the request (in C), then the same
# checks as above run on the values, remembered for the values that repeat across a catalog (idcs, icons,
# partitions, products, owners). It only ever accepts: whatever it refuses, the checks above read again to
# say why, so the messages stay theirs. tests/test_catalog_files.py holds the two to the same answers.
_CANONICAL_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_REMEMBERED = 4096  # distinct values per kind, then forgotten all at once
_idcs: dict[str, bool] = {}
_icons: dict[str, bool] = {}
_products_seen: dict[str, bool] = {}
_owners: dict[str, uuid.UUID | None] = {}
_product_lists: dict[tuple[str, ...], tuple[str, ...] | bool | None] = {}
_partitions_seen: dict[tuple[str, str, str, str], Partition | None] = {}


def _remember(table: dict[Any, T], key: Any, answer: T) -> T:
    if len(table) >= _REMEMBERED:
        table.clear()
    table[key] = answer
    return answer


def _canonical_uuid(raw: str) -> uuid.UUID | None:
    """``parse_uuid``, in C for the canonical form (the only one it accepts)."""
    if _CANONICAL_UUID_RE.fullmatch(raw) is None:
        return None
    return msgspec.convert(raw, uuid.UUID)


def _fits(value: str, regex: re.Pattern[str], max_len: int) -> bool:
    return len(value) <= max_len and regex.fullmatch(value) is not None


def _filled(value: str, max_len: int) -> bool:
    return 0 < len(value) <= max_len and "\x00" not in value


def _good_partition(key: tuple[str, str, str, str]) -> bool:
    name, mount, size, fs = key
    return (
        _fits(name, _NAME_RE, NAME_MAX) and _filled(mount, 1024) and _filled(size, 256) and _filled(fs, 256)
    )


class CatalogFields(msgspec.Struct):
    """The fields of a catalog entry, typed (decoded straight from JSON by ``catalog_files``)."""

    idc: str
    orgId: str
    path: str
    name: str
    OSSeries: str
    OSVersion: str
    OSArchitecture: str
    BootMode: ImageBootMode
    SystemDiskSize: str
    DefaultPartitionTable: list[Partition]
    icon: str
    supportedProducts: list[str]
    type: ImageType | None = None
    id: str | None = None
    createdAt: dt.datetime | None = None


def _fast_catalog_entry(item: Any) -> CatalogEntry | None:
    """The entry when ``item`` is valid (None: let the checks say what is wrong)."""
    if type(item) is not dict:
        return None
    # msgspec would also take tuples for lists and any mapping for an object; the checks above do not
    partitions, products = item.get("DefaultPartitionTable"), item.get("supportedProducts")
    if type(partitions) is not list or type(products) is not list:
        return None
    for partition in partitions:
        if type(partition) is not dict:
            return None
    try:
        fields = msgspec.convert(item, CatalogFields)
    except msgspec.ValidationError:
        return None
    return entry_of_fields(fields)


def entry_of_fields(fields: CatalogFields) -> CatalogEntry | None:
    """The entry when these typed fields pass every check above (None: some do not)."""
    org_id = _owners.get(fields.orgId, _MISSING)
    if org_id is _MISSING:
        org_id = _remember(_owners, fields.orgId, _canonical_uuid(fields.orgId))
    if org_id is None:
        return None
    image_id = None
    if fields.id is not None:
        image_id = _canonical_uuid(fields.id)
        if image_id is None:
            return None
    created_at = fields.createdAt
    if created_at is not None:
        if created_at.tzinfo is None:
            return None
        if created_at.tzinfo is not dt.UTC:
            created_at = created_at.astimezone(dt.UTC)
    idc, name, icon = fields.idc, fields.name, fields.icon
    good = _idcs.get(idc)
    if good is None:
        good = _remember(_idcs, idc, _fits(idc, _IDC_RE, IDC_MAX))
    if not good or len(name) > NAME_MAX or _NAME_RE.fullmatch(name) is None:
        return None
    good = _icons.get(icon)
    if good is None:
        good = _remember(_icons, icon, "\x00" not in icon and is_uri(icon))
    if not good or "\x00" in (
        f"{fields.path}{fields.OSSeries}{fields.OSVersion}{fields.OSArchitecture}{fields.SystemDiskSize}"
    ):
        return None
    products = fields.supportedProducts
    # a catalog has few distinct product lists: each is checked (and freed of repeats) once
    product_key = tuple(products)
    known = _product_lists.get(product_key, _MISSING)
    if known is _MISSING:
        known = _remember(_product_lists, product_key, _good_products(products))
    if known is None:
        return None
    if known is not True:
        products = list(known)
    partitions = fields.DefaultPartitionTable
    if not partitions:
        return None
    table = []
    for partition in partitions:
        key = (partition.name, partition.mountPoint, partition.size, partition.fileSystem)
        shared = _partitions_seen.get(key, _MISSING)
        if shared is _MISSING:
            shared = _remember(_partitions_seen, key, partition if _good_partition(key) else None)
        if shared is None:
            return None
        table.append(shared)  # one object per distinct partition: what is written renders it once
    spec = ImageCreateReq(
        idc,
        org_id,
        fields.path,
        name,
        fields.OSSeries,
        fields.OSVersion,
        fields.OSArchitecture,
        fields.BootMode,
        fields.SystemDiskSize,
        table,
        icon,
        products,
    )
    return CatalogEntry(spec, fields.type or ImageType.PUBLIC, image_id, created_at)


def _good_products(products: list[str]) -> tuple[str, ...] | bool | None:
    """None: some product is invalid; True: all are valid and distinct; else the list without repeats."""
    for product in products:
        good = _products_seen.get(product)
        if good is None:
            good = _remember(_products_seen, product, _fits(product, _PRODUCT_RE, PRODUCT_MAX))
        if not good:
            return None
    if len(set(products)) != len(products):
        return tuple(dict.fromkeys(products))
    return True


def read_catalog_entry(item: Any, index: int, problems: list[ValidationDetail]) -> CatalogEntry | None:
    """Entry ``index`` of a catalog file, or None with its problems (fields named ``[index].…``)
    appended to ``problems``."""
    entry = _fast_catalog_entry(item)
    if entry is not None:
        return entry
    return _checked_catalog_entry(item, index, problems)


def _checked_catalog_entry(item: Any, index: int, problems: list[ValidationDetail]) -> CatalogEntry | None:
    prefix = f"[{index}]."
    before = len(problems)
    spec = read_image_create(item, problems, prefix)
    if not isinstance(item, dict):
        return None
    fields = _Fields(item, prefix, problems)
    image_type = fields.enum("type", ImageType, required=False) or ImageType.PUBLIC
    image_id = fields.uuid("id", required=False)
    created_at = fields.datetime("createdAt")
    if spec is None or len(problems) != before:
        return None
    return CatalogEntry(spec=spec, type=image_type, id=image_id, created_at=created_at)


def not_a_catalog(data: Any) -> RequestInvalid:
    return RequestInvalid(
        [detail("catalog", "type", "A catalog file holds a list of images.", data, "array")]
    )


def read_catalog_entries(data: Any) -> list[CatalogEntry]:
    """Validate a whole catalog file (a list of entries); every problem in every entry is reported."""
    if not isinstance(data, list):
        raise not_a_catalog(data)
    problems: list[ValidationDetail] = []
    entries: list[CatalogEntry] = []
    for index, item in enumerate(data):
        entry = read_catalog_entry(item, index, problems)
        if entry is not None:
            entries.append(entry)
    if problems:
        raise RequestInvalid(problems, message="Invalid catalog file.")
    return entries


def read_create_request(data: Any) -> tuple[ImageCreateReq, ImageType]:
    """``POST /v1/images`` body: an ImageCreateReq plus optional ``type`` (default Customized)."""
    problems: list[ValidationDetail] = []
    spec = read_image_create(data, problems)
    image_type = ImageType.CUSTOMIZED
    if isinstance(data, dict):
        image_type = _Fields(data, "", problems).enum("type", ImageType, required=False) or image_type
    if problems or spec is None:
        raise RequestInvalid(problems)
    return spec, image_type


IMMUTABLE_FIELDS = ("id", "type", "orgId", "idc", "createdAt")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def read_patch(current: dict[str, Any], patch: Any) -> ImageCreateReq:
    """Apply a merge patch to an image's current fields and validate the result as a whole."""
    if not isinstance(patch, dict):
        raise RequestInvalid(
            [detail("body", "type", "A merge patch must be a JSON object.", patch, "object")]
        )
    problems = [
        detail(name, "readonly", "This field cannot be changed.", patch[name])
        for name in IMMUTABLE_FIELDS
        if name in patch and patch[name] != current.get(name)
    ]
    merged = merge_patch(current, patch)
    spec = read_image_create(merged, problems)
    if problems or spec is None:
        raise RequestInvalid(problems)
    return spec
