"""Entries of catalog files: ``CatalogEntry``, the checked path (the rules of ``images``) and the fast path
(msgspec builds the request, then each distinct value is checked once). A file's problems raise
``Invalid`` (the server answers it as a 400; the CLI prints its details).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

import msgspec

from ..invalid import Invalid
from ..schemas import ImageBootMode, ImageCreateReq, ImageType, Partition, ValidationDetail
from .fields import (
    _IDC_RE,
    _MISSING,
    _NAME_RE,
    _PRODUCT_RE,
    IDC_MAX,
    NAME_MAX,
    PRODUCT_MAX,
    T,
    detail,
    is_uri,
)
from .images import _Fields, read_image_create


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


def not_a_catalog(data: Any) -> Invalid:
    return Invalid([detail("catalog", "type", "A catalog file holds a list of images.", data, "array")])


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
        raise Invalid(problems, message="Invalid catalog file.")
    return entries
