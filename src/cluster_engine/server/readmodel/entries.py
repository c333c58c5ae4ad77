"""The read model's entries: one held image, built from its stored body (the served JSON).

Building one decodes only the few fields it is indexed by and never re-encodes; product lists and
revisions that repeat across a catalog are shared between entries.
"""

from __future__ import annotations

import datetime as dt
import sys

import msgspec

from ...storage.records import PUBLIC_NAMESPACE
from ..compact import BodyCodec

SortKey = tuple[str, str]


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One image as held. A msgspec Struct: built several times faster than a frozen dataclass, and
    smaller (no GC header: it holds only strings, bytes and tuples of them, so it can't be in a cycle)."""

    id: str  # canonical lowercase uuid
    json: bytes  # the image's serialized ImageResp; a Customized one packed by the catalog's BodyCodec
    key: SortKey  # (createdAt as YYYY-MM-DDTHH:MM:SS.ffffff in UTC, id): string order equals time order
    namespace: str  # "public", or the owner org's id
    idc: str
    products: tuple[str, ...]
    revision: int  # the catalog revision that wrote this state of the image


def sort_key(entry: Entry) -> SortKey:
    """List order (documented in the served OpenAPI document): ``createdAt`` ascending, then ``id``."""
    return entry.key


class _Indexed(msgspec.Struct):
    """The fields of a served image that the read model indexes it by (the rest stays in the bytes)."""

    id: str
    type: str
    orgId: str
    idc: str
    supportedProducts: list[str]
    createdAt: str


_indexed = msgspec.json.Decoder(_Indexed)


def _created_key(created: str) -> str:
    """``createdAt`` as stored bodies spell it (msgspec: UTC "Z", a four-digit year, six fraction digits
    or none) in one fixed-width form, so that string order is time order."""
    if len(created) == 20 and created[19] == "Z":
        return created[:19] + ".000000"
    if len(created) == 27 and created[26] == "Z":
        return created[:26]
    moment = dt.datetime.fromisoformat(created).astimezone(dt.UTC)  # any other spelling of an instant
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds")


# Product lists are shared between entries that have the same one (a catalog has few distinct lists).
_product_lists: dict[tuple[str, ...], tuple[str, ...]] = {}


def _products(listed: list[str]) -> tuple[str, ...]:
    products = tuple(listed)
    shared = _product_lists.get(products)
    if shared is None:
        if len(_product_lists) >= 100_000:  # arbitrary lists from writes: stay bounded
            _product_lists.clear()
        shared = _product_lists[products] = tuple([sys.intern(p) for p in products])
    return shared


# Revisions are shared too: a catalog import stamps every row with one, and each int object costs 32 bytes.
_revisions: dict[int, int] = {}


def make_entry(body: bytes, revision: int, codec: BodyCodec) -> Entry:
    """An entry from an image's stored body (its served JSON), a Customized one packed by ``codec``."""
    fields = _indexed.decode(body)
    shared = _revisions.get(revision)
    if shared is None:
        if len(_revisions) >= 100_000:
            _revisions.clear()
        shared = _revisions[revision] = revision
    public = fields.type == "Public"
    return Entry(
        fields.id,
        body if public else codec.pack(body),
        (_created_key(fields.createdAt), fields.id),
        PUBLIC_NAMESPACE if public else sys.intern(fields.orgId),
        sys.intern(fields.idc),
        _products(fields.supportedProducts),
        shared,
    )
