"""Catalog files at scale: ``cluster-engine catalog import`` and ``catalog export`` in bounded memory.

Import reads the file entry by entry (JSON as a stream, a block at a time decoded by msgspec straight into
typed fields, ijson for what cannot be cut into blocks; YAML is read whole), validates each entry as it
comes, and plans it against a compact index of the images already stored: per image its
id, a digest of its identity (namespace, idc, name), a digest of its served JSON (``images.body``) and its
createdAt. An entry is unchanged iff the body it renders to is the stored one, since the body renders every
served field. The plan (``Planner``, no I/O) decides create, update or unchanged per entry and the checks
that need the whole file (duplicate entries, two entries for one image, names taken in the end state,
``--prune``); the writes go out in batches as the file is read, all in the one transaction that bumped
the revision, so a file that fails anywhere changes nothing, and a dry run rolls back after everything,
constraints included, has run.

Export streams ``images.body`` in (created_at, id) order and writes JSON or YAML incrementally, byte for
byte what ``json.dumps(…, indent=2)`` and ``yaml.safe_dump`` of the whole list write.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import io
import itertools
import json
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Literal

import msgspec
import sqlalchemy as sa
import yaml

from ..schemas import ImageType, ValidationDetail, json_encoder
from ..server.errors import Conflict, RequestInvalid
from ..server.validation import (
    CatalogEntry,
    CatalogFields,
    detail,
    entry_of_fields,
    not_a_catalog,
    read_catalog_entry,
)
from .db import audit_log, images
from .store import make_image

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from .store import Actor, ImportReport, Store

PUBLIC_NAMESPACE = "public"
DUPLICATE = "an image with this name already exists in this idc for this owner"
INVALID_FILE = "Invalid catalog file."
# A file that starts like JSON but is not JSON may be YAML in flow style: read again as YAML when it is at
# most this big (YAML is read whole, and a truncated JSON file of millions of images must not be).
YAML_RETRY_BYTES = 32 * 1024 * 1024
# Problems kept for the report; the rest are counted (a generated file that is wrong is wrong everywhere).
PROBLEMS_KEPT = 10_000
CREATE_BATCH = 5_000
UPDATE_BATCH = 2_000
ID_BATCH = 500  # ids per IN (…) on SQLite

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


class CatalogFileError(Exception):
    """The file is neither JSON nor YAML; the message says why."""


class CatalogInvalid(RequestInvalid):
    """The file's entries are invalid: the first ``PROBLEMS_KEPT`` problems, and how many more there are."""

    def __init__(self, details: Sequence[ValidationDetail], omitted: int = 0) -> None:
        super().__init__(details, message=INVALID_FILE)
        self.omitted = omitted


class _Problems:
    def __init__(self) -> None:
        self.kept: list[ValidationDetail] = []
        self.omitted = 0

    def __bool__(self) -> bool:
        return bool(self.kept)

    def add(self, problem: ValidationDetail) -> None:
        if len(self.kept) < PROBLEMS_KEPT:
            self.kept.append(problem)
        else:
            self.omitted += 1

    def extend(self, problems: Iterable[ValidationDetail]) -> None:
        for problem in problems:
            self.add(problem)

    def error(self) -> CatalogInvalid:
        return CatalogInvalid(self.kept, self.omitted)


def namespace_of(image_type: ImageType, org_id: uuid.UUID) -> str:
    return PUBLIC_NAMESPACE if image_type is ImageType.PUBLIC else str(org_id)


def identity_key(namespace: str, idc: str, name: str) -> int:
    """A 128-bit digest of an image's identity: the index keeps this instead of three strings."""
    digest = hashlib.blake2b(f"{namespace}\x00{idc}\x00{name}".encode(), digest_size=16).digest()
    return int.from_bytes(digest)


def body_digest(body: bytes) -> bytes:
    """What the index keeps of a body (PostgreSQL computes the same with ``md5(body)``)."""
    return hashlib.md5(body, usedforsecurity=False).digest()


def _micros(value: dt.datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


# ---------------------------------------------------------------------------------------------- progress


class Progress:
    """One self-rewriting status line on stderr for a command that runs more than a moment, when stderr is
    a terminal; nothing at all otherwise (so captured output never changes)."""

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool | None = None, delay: float = 1.0):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay = delay
        self.start = time.monotonic()
        self.label = ""
        self.shown = False
        self.drawn = 0.0
        self.width = 0

    def phase(self, label: str) -> None:
        if self.shown:
            self._finish_line()
        self.label = label
        self.update("")

    def update(self, status: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay or (not force and now - self.drawn < 0.2):
            return
        line = f"{self.label} {status}".rstrip() + f"  [{now - self.start:.0f}s]"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width, self.shown, self.drawn = len(line), True, now

    def _finish_line(self) -> None:
        self.update("done", force=True)
        self.stream.write("\n")
        self.stream.flush()
        self.shown, self.width = False, 0

    def close(self) -> None:
        if self.shown:
            self._finish_line()


QUIET = Progress(io.StringIO(), enabled=False)


# ---------------------------------------------------------------------------------------------- reading


class _NotJson(Exception):
    pass


class _Recorder:
    """A binary reader that hands out ``head`` and then the file, and keeps what it handed out while that
    is at most ``YAML_RETRY_BYTES``: a file that turns out not to be JSON can then be read again as YAML,
    also from a pipe."""

    def __init__(self, raw: BinaryIO, head: bytes) -> None:
        self.raw, self.head = raw, head
        self.kept: list[bytes] | None = []
        self.kept_bytes = 0
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson asks for nothing first, to see whether it reads bytes or text
            return b""
        if self.head:
            cut = len(self.head) if size < 0 else size
            data, self.head = self.head[:cut], self.head[cut:]
        else:
            data = self.raw.read(size)
        self.position += len(data)
        if self.kept is not None and data:
            self.kept_bytes += len(data)
            if self.kept_bytes > YAML_RETRY_BYTES:
                self.kept = None
            else:
                self.kept.append(data)
        return data

    def whole(self) -> bytes | None:
        """The whole file, when what was read of it so far was kept and all of it is small enough."""
        if self.kept is None:
            return None
        parts = [*self.kept, self.head]
        size = self.kept_bytes + len(self.head)
        while size <= YAML_RETRY_BYTES and (data := self.raw.read(YAML_RETRY_BYTES + 1 - size)):
            parts.append(data)
            size += len(data)
        return b"".join(parts) if size <= YAML_RETRY_BYTES else None


def _decode_whole(data: bytes, name: str, *, try_json: bool = True) -> Any:
    """A whole file: JSON through msgspec when it looks like JSON, anything else as YAML (as before)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogFileError(f"{name}: not valid YAML or JSON: {exc}") from None
    if try_json and text.lstrip()[:1] in ("[", "{"):
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError:
            pass  # YAML flow style can look like JSON; let the YAML parser judge it
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it
    try:
        return yaml.load(text, Loader=loader)  # a safe loader either way
    except yaml.YAMLError as exc:
        raise CatalogFileError(f"{name}: not valid YAML or JSON: {exc}") from None


class CatalogSource:
    """The raw entries of a catalog file (``items``) and how far reading has got (``position`` of
    ``size`` bytes). A file whose first character is ``[`` is parsed as a stream of JSON values; anything
    else is read whole (YAML, or a JSON object: no catalog). Raises CatalogFileError when the file is read
    whole and is neither."""

    def __init__(self, file: BinaryIO, name: str, *, whole: bytes | None = None) -> None:
        self.name = name
        self.size: int | None = None
        self.reader: _Recorder | None = None
        if whole is not None:  # a file that turned out not to be JSON, read again as YAML
            self.size = len(whole)
            self.data = _decode_whole(whole, name, try_json=False)
            return
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            self.size = _file_size(file)
        head = b""
        while not head.lstrip():
            chunk = file.read(65536)
            if not chunk:
                break
            head += chunk
        if head.lstrip()[:1] == b"[":
            self.reader = _Recorder(file, head)
            self.data = None
        else:
            self.data = _decode_whole(head + file.read(), name)

    @property
    def position(self) -> int:
        return self.reader.position if self.reader is not None else 0

    def items(self) -> Iterator[Any]:
        """The file's entries: raw (decoded JSON or YAML), or already CatalogEntry when a JSON entry passed
        every check as it was decoded."""
        if self.reader is None:
            if not isinstance(self.data, list):
                raise not_a_catalog(self.data)
            yield from self.data
            return
        yield from _json_entries(self.reader)

    def as_yaml(self, problem: _NotJson) -> CatalogSource:
        """After ``items`` found that the file is not JSON: the same file, read whole as YAML."""
        data = self.reader.whole() if self.reader is not None else None
        if data is None:
            position = self.reader.position if self.reader is not None else 0
            raise CatalogFileError(
                f"{self.name}: not valid YAML or JSON: {problem} (near byte {position:,}; a file over "
                f"{YAML_RETRY_BYTES >> 20} MiB that starts with '[' is read as JSON only)"
            )
        return CatalogSource(io.BytesIO(), self.name, whole=data)


# Where a JSON array's entries may end: a "}" and the comma before the next "{". Only a cut at the end of a
# whole top-level entry makes "[" + what precedes it + "]" decode (a cut inside a string leaves it open, one
# inside a nested value leaves its brackets open), so decoding proves the cut right.
_CUT = re.compile(rb"\}\s*,\s*(?=\{)")
_CUT_TRIES = 8
_CUT_TAIL = 1 << 15
JSON_BLOCK = 1 << 18
JSON_PENDING_MAX = 64 << 20  # no cut found in this much: ijson reads the rest
_typed_decoder = msgspec.json.Decoder(list[CatalogFields])
_raw_decoder = msgspec.json.Decoder()


def _decode_segment(data: bytes) -> list[Any] | None:
    """The entries of a JSON array (typed when they all type-check), or None when ``data`` is no array."""
    try:
        return _typed_decoder.decode(data)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError:
        return None
    try:
        return list(_raw_decoder.decode(data))
    except msgspec.DecodeError:
        return None


def _json_entries(reader: _Recorder) -> Iterator[Any]:
    """A JSON array's entries, a block (``JSON_BLOCK``) at a time: each block's whole entries are decoded by
    msgspec straight into typed fields and checked (``entry_of_fields``), in a fraction of what a parser
    that builds every object in Python costs; what does not pass is handed on raw, for the checks to say
    why. Whatever this cannot cut into blocks goes to ijson, which also names the first syntax error."""
    pending = b""
    while not pending.strip() and (chunk := reader.read(JSON_BLOCK)):
        pending += chunk
    pending = pending.lstrip()[1:]  # after the "["
    after_comma = False
    while True:
        searched = max(0, len(pending) - 64)
        block = reader.read(JSON_BLOCK)
        if not block:  # the last entries and the "]"
            if after_comma and pending.lstrip()[:1] == b"]":
                raise _NotJson("parse error: a comma before the closing ']'")
            entries = _decode_segment(b"[" + pending)
            if entries is None:
                yield from _ijson_entries(b"[" + pending, reader)
                return
            yield from _checked(entries, b"[" + pending)
            return
        pending += block
        for cut in _cuts(pending, searched):
            segment = b"[" + pending[: cut.start() + 1] + b"]"
            entries = _decode_segment(segment)
            if entries is not None:
                yield from _checked(entries, segment)
                pending, after_comma = pending[cut.end() :], True
                break
        else:
            if len(pending) > JSON_PENDING_MAX:
                yield from _ijson_entries(b"[" + pending, reader)
                return


def _cuts(pending: bytes, searched: int) -> list[re.Match[bytes]]:
    """The cuts to try (any that decodes is right), best first: the last ones after ``searched``, those at
    a line's end (as in generated files, one entry a line: right almost always) before the others. Looked
    for in the last ``_CUT_TAIL`` bytes first (not in the whole block: that costs a tenth of reading)."""
    tail = max(searched, len(pending) - _CUT_TAIL)
    cuts = list(_CUT.finditer(pending, tail))
    if len(cuts) < _CUT_TRIES and tail > searched:
        cuts = list(_CUT.finditer(pending, searched))
    lines = [cut for cut in cuts if b"\n" in cut.group()]
    others = [cut for cut in cuts if b"\n" not in cut.group()]
    return [*reversed(lines), *reversed(others)][:_CUT_TRIES]


def _checked(entries: list[Any], segment: bytes) -> Iterator[Any]:
    raw: list[Any] | None = None
    for position, entry in enumerate(entries):
        if type(entry) is not CatalogFields:
            yield entry
            continue
        checked = entry_of_fields(entry)
        if checked is None:  # the checks say why on the entry as decoded
            raw = raw if raw is not None else _raw_decoder.decode(segment)
            yield raw[position]
        else:
            yield checked


class _Prefixed:
    def __init__(self, head: bytes, rest: _Recorder) -> None:
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        if self.head:
            data, self.head = self.head, b""
            return data
        return self.rest.read(size)


def _ijson_entries(head: bytes, rest: _Recorder) -> Iterator[Any]:
    import ijson

    try:
        yield from ijson.items(_Prefixed(head, rest), "item", use_float=True)
    except ijson.JSONError as exc:
        message = str(exc).strip().splitlines()
        raise _NotJson(message[0] if message else type(exc).__name__) from None


def _file_size(file: BinaryIO) -> int | None:
    import os
    import stat

    info = os.fstat(file.fileno())
    return info.st_size if stat.S_ISREG(info.st_mode) else None


# ---------------------------------------------------------------------------------------------- the index


class ExistingIndex:
    """The images already stored, compactly (a few hundred bytes each): a slot per image, found by id
    (``uuid.int``) or by identity digest, and per slot the body digest, createdAt and Public or not."""

    def __init__(self) -> None:
        self.slot_of_id: dict[int, int] = {}
        self.slot_of_identity: dict[int, int] = {}
        self.ids = bytearray()  # 16 bytes per slot
        self.digests = bytearray()  # 16 bytes per slot
        self.created = array.array("q")  # microseconds since the epoch
        self.public = bytearray()

    def __len__(self) -> int:
        return len(self.created)

    def add(
        self,
        image_id: int,
        namespace: str,
        idc: str,
        name: str,
        digest: bytes,
        created_at: dt.datetime,
    ) -> None:
        slot = len(self.created)
        self.slot_of_id[image_id] = slot
        self.slot_of_identity[identity_key(namespace, idc, name)] = slot
        self.ids += image_id.to_bytes(16)
        self.digests += digest
        self.created.append(_micros(created_at))
        self.public.append(namespace == PUBLIC_NAMESPACE)

    def image_id(self, slot: int) -> uuid.UUID:
        return uuid.UUID(bytes=bytes(self.ids[16 * slot : 16 * slot + 16]))

    def digest(self, slot: int) -> bytes:
        return bytes(self.digests[16 * slot : 16 * slot + 16])

    def created_at(self, slot: int) -> dt.datetime:
        return _EPOCH + dt.timedelta(microseconds=self.created[slot])


# ----------------------------------------------------------------------------------------------- planning


@dataclass(slots=True)
class Write:
    """A create or update as planned: the row's values come from ``entry``, ``body`` is the image as
    it will be served."""

    kind: Literal["create", "update"]
    position: int  # the entry's index in the file
    image_id: uuid.UUID
    entry: CatalogEntry
    namespace: str
    created_at: dt.datetime
    body: bytes
    set_created: bool  # an update that sets createdAt (the entry gives one)


@dataclass(slots=True)
class Plan:
    """What is left once every entry was planned: deletes (``--prune``), then the writes that had to wait
    for them or for other images to move out of the way (renames onto names that are free only at the
    end), updates first."""

    deleted: list[uuid.UUID]
    deferred: list[Write]


class Planner:
    """Decides, entry by entry, what an import does, against the images stored before it (``index``); pure
    (no I/O), so the semantics are tested without a database.

    ``add`` returns the write to do now, or None (unchanged, deferred, or after a problem: then nothing
    more is written and only problems are gathered). ``finish`` raises the problems in the order the checks
    rank them (duplicate entries, then two entries for one image, then names taken in the end state) or
    returns the ``Plan``.
    """

    def __init__(self, index: ExistingIndex, report: ImportReport, *, prune: bool, now: dt.datetime):
        self.index, self.report, self.prune, self.now = index, report, prune, now
        n = len(index)
        self.claimed_by = array.array("q", [-1]) * n  # the entry that targets the stored image
        self.id_seen = array.array("q", [-1]) * n  # the last entry that named the stored image's id
        self.identity_seen = array.array("q", [-1]) * n  # … or its identity
        self.new_ids: dict[int, int] = {}  # ids not stored yet → the last entry naming them
        self.new_identities: dict[int, int] = {}
        self.duplicates = _Problems()
        self.twice: ValidationDetail | None = None  # the first entry for an image another entry has
        self.invalid = False  # some entry failed validation: its problems are all that will be reported
        self.deferred: list[tuple[Write, int]] = []  # (write, the stored image that has its identity now)
        self.org_namespaces: dict[uuid.UUID, str] = {}

    def _org_namespace(self, org: uuid.UUID) -> str:
        if len(self.org_namespaces) >= 4096:
            self.org_namespaces.clear()
        namespace = self.org_namespaces[org] = str(org)
        return namespace

    @property
    def refused(self) -> bool:
        return self.invalid or bool(self.duplicates) or self.twice is not None

    def skip(self) -> None:
        """An entry failed validation."""
        self.invalid = True

    def add(self, position: int, entry: CatalogEntry) -> Write | None:
        if self.invalid:
            return None
        index = self.index
        spec = entry.spec
        if entry.type is ImageType.PUBLIC:
            namespace = PUBLIC_NAMESPACE
        else:
            namespace = self.org_namespaces.get(spec.orgId) or self._org_namespace(spec.orgId)
        key = identity_key(namespace, spec.idc, spec.name)
        # duplicate entries: the same id, or the same identity, as an earlier entry
        by_id = None
        if entry.id is not None:
            image_int = entry.id.int
            by_id = index.slot_of_id.get(image_int)
            if by_id is not None:
                last, self.id_seen[by_id] = self.id_seen[by_id], position
            else:
                last = self.new_ids.get(image_int, -1)
                self.new_ids[image_int] = position
            if last >= 0:
                self.duplicates.add(
                    detail(f"[{position}].id", "unique", f"Same id as entry {last}.", str(entry.id))
                )
        holder = index.slot_of_identity.get(key)  # the stored image with this identity now
        if holder is not None:
            last, self.identity_seen[holder] = self.identity_seen[holder], position
        else:
            last = self.new_identities.get(key, -1)
            self.new_identities[key] = position
        if last >= 0:
            self.duplicates.add(
                detail(
                    f"[{position}].name", "unique", f"Same idc, name and owner as entry {last}.", spec.name
                )
            )
        target = by_id if entry.id is not None else holder
        if target is not None:
            claimer = self.claimed_by[target]
            if claimer >= 0:
                if self.twice is None:
                    target_id = entry.id or index.image_id(target)
                    self.twice = detail(
                        f"[{position}]",
                        "unique",
                        f"Refers to the same image as entry {claimer}.",
                        str(target_id),
                    )
            else:
                self.claimed_by[target] = position
        if self.refused:
            return None
        if target is None:  # a new image
            image_id = entry.id or uuid.uuid4()
            created_at = entry.created_at or self.now
            write = Write(
                "create",
                position,
                image_id,
                entry,
                namespace,
                created_at,
                _render(image_id, entry, created_at),
                True,
            )
            self.report.created.append(image_id)
        else:
            image_id = entry.id or index.image_id(target)
            created_at = entry.created_at or index.created_at(target)
            body = _render(image_id, entry, created_at)
            if body_digest(body) == index.digest(target):
                self.report.unchanged.append(image_id)
                return None
            write = Write(
                "update", position, image_id, entry, namespace, created_at, body, entry.created_at is not None
            )
            self.report.updated.append(image_id)
        if holder is not None and holder != target:
            # its name belongs to another stored image now: written once that one has moved or is deleted
            self.deferred.append((write, holder))
            return None
        return write

    def finish(self) -> Plan:
        if self.duplicates:
            raise self.duplicates.error()
        if self.twice is not None:
            raise CatalogInvalid([self.twice])
        index = self.index
        deleted: list[uuid.UUID] = []
        if self.prune:
            claimed_by, public = self.claimed_by, index.public
            deleted = [
                uuid.UUID(int=image_int)
                for image_int, slot in index.slot_of_id.items()
                if public[slot] and claimed_by[slot] < 0
            ]
            self.report.deleted.extend(deleted)
        taken = [
            write
            for write, holder in self.deferred
            if self.claimed_by[holder] < 0 and not (self.prune and index.public[holder])
        ]
        if taken:
            first = min(taken, key=lambda write: (write.kind == "create", write.position))
            spec = first.entry.spec
            raise Conflict(f"{spec.idc}/{spec.name}: {DUPLICATE}")
        deferred = [write for write, _ in self.deferred]
        deferred.sort(key=lambda write: write.kind == "create")
        return Plan(deleted=deleted, deferred=deferred)


def _render(image_id: uuid.UUID, entry: CatalogEntry, created_at: dt.datetime) -> bytes:
    """The image's body: what ``store.make_image`` serves, encoded."""
    return _encode(make_image(image_id, entry.type, entry.spec, created_at))


_encode = json_encoder.encode


# ------------------------------------------------------------------------------------------------ writing

# The images columns in table order: every row value tuple below follows it (a test checks it).
IMAGE_COLUMNS = (
    "id",
    "type",
    "org_id",
    "namespace",
    "idc",
    "name",
    "path",
    "os_series",
    "os_version",
    "os_architecture",
    "boot_mode",
    "system_disk_size",
    "icon",
    "default_partition_table",
    "supported_products",
    "created_at",
    "updated_at",
    "revision",
    "body",
)
AUDIT_COLUMNS = ("at", "revision", "action", "image_id", "actor_org", "actor", "changes")


def _same(value: Any) -> Any:
    return value


class _Database:
    """An import's statements on one backend, on the driver's own connection, inside the transaction
    SQLAlchemy began (SQLAlchemy's per-row work would cost more than the database's here). Values are
    adapted as SQLAlchemy's column types adapt them (their own bind processors where they have one), so
    rows are stored exactly as the other writes store them."""

    def __init__(self, driver: Any, dialect: sa.Dialect) -> None:
        self.driver, self.dialect = driver, dialect
        columns = images.c

        def processor(column: sa.Column[Any]) -> Callable[[Any], Any]:
            return column.type.bind_processor(dialect) or _same

        self.uuid = processor(columns.id)
        self.when = processor(columns.created_at)
        self.json = json.dumps  # what SQLAlchemy's JSON type writes, on either backend
        self.tables: dict[tuple[int, ...], tuple[list[Any], str]] = {}
        self.products: dict[tuple[str, ...], str] = {}

    def image_rows(self, writes: list[Write], revision: int, now: dt.datetime) -> list[tuple[Any, ...]]:
        uuid_value, when, tables, products = self.uuid, self.when, self.tables, self.products
        updated_at = when(now)
        rows = []
        for write in writes:
            spec = write.entry.spec
            # the JSON columns repeat across a catalog: rendered once per distinct value (the partitions
            # are the validator's shared objects, kept alive here, so their ids stand for them)
            key = tuple(map(id, spec.DefaultPartitionTable))
            table = tables.get(key)
            if table is None or table[0] != spec.DefaultPartitionTable:
                if len(tables) >= 4096:
                    tables.clear()
                table = tables[key] = (
                    list(spec.DefaultPartitionTable),
                    self.json(msgspec.to_builtins(spec.DefaultPartitionTable)),
                )
            product_key = tuple(spec.supportedProducts)
            product_text = products.get(product_key)
            if product_text is None:
                if len(products) >= 4096:
                    products.clear()
                product_text = products[product_key] = self.json(spec.supportedProducts)
            rows.append(
                (
                    uuid_value(write.image_id),
                    write.entry.type.value,
                    uuid_value(spec.orgId),
                    write.namespace,
                    spec.idc,
                    spec.name,
                    spec.path,
                    spec.OSSeries,
                    spec.OSVersion,
                    spec.OSArchitecture,
                    spec.BootMode.value,
                    spec.SystemDiskSize,
                    spec.icon,
                    table[1],
                    product_text,
                    when(write.created_at) if write.set_created else None,
                    updated_at,
                    revision,
                    write.body,
                )
            )
        return rows

    def audit_rows(
        self,
        at: dt.datetime,
        revision: int,
        action: str,
        actor: Actor,
        changes: Iterable[tuple[uuid.UUID, str]],
    ) -> list[tuple[Any, ...]]:
        """Audit rows for (image id, changes as JSON text)."""
        when, org, image = self.when(at), None if actor.org_id is None else self.uuid(actor.org_id), self.uuid
        return [(when, revision, action, image(i), org, actor.name, text) for i, text in changes]

    async def prepare(self) -> None:
        """Before the first statement."""

    async def done(self) -> None:
        """After the last statement (also when the import fails)."""

    def index_rows(self) -> AsyncIterator[list[tuple[Any, ...]]]:
        raise NotImplementedError

    async def load_index(self, progress: Progress) -> ExistingIndex:
        index = ExistingIndex()
        async for rows in self.index_rows():
            for image_id, namespace, idc, name, created_at, digest in rows:
                index.add(image_id, namespace, idc, name, digest, created_at)
            progress.update(f"{len(index):,}")
        return index

    async def create(self, writes: list[Write], revision: int, now: dt.datetime, actor: Actor) -> None:
        """Insert these new images, and their audit rows (a create records the whole new image: its
        served JSON)."""
        raise NotImplementedError

    async def update(self, writes: list[Write], revision: int, now: dt.datetime) -> None:
        """Write these images' new values (their audit rows are the caller's: it has their diffs)."""
        raise NotImplementedError

    async def bodies(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        raise NotImplementedError

    async def move_away(self, ids: list[uuid.UUID]) -> None:
        """Give these images names no entry can have ("~" is never in a name), so that names can move
        between images (swapped in one file) without ever being held twice."""
        raise NotImplementedError

    async def delete(self, ids: list[uuid.UUID], revision: int) -> list[tuple[uuid.UUID, bytes]]:
        """Delete these images (recording them in deleted_images); their ids and bodies."""
        raise NotImplementedError

    async def audit(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class _Sqlite(_Database):
    # the page cache an import may use (the table and its indexes are written at random places)
    CACHE_KIB = 131072
    ROWS_PER_INSERT = 400  # 7,600 parameters at most (SQLite allows 32,766)

    async def prepare(self) -> None:
        await self.driver.execute(f"PRAGMA cache_size = -{self.CACHE_KIB}")

    async def done(self) -> None:
        await self.driver.execute("PRAGMA cache_size = -2000")  # SQLite's default

    async def index_rows(self) -> AsyncIterator[list[tuple[Any, ...]]]:
        cursor = await self.driver.execute("SELECT id, namespace, idc, name, created_at, body FROM images")
        try:
            while rows := await cursor.fetchmany(5000):
                yield [
                    (
                        int(raw_id, 16) if len(raw_id) == 32 else uuid.UUID(raw_id).int,
                        namespace,
                        idc,
                        name,
                        _sqlite_time(created_at),
                        body_digest(body if isinstance(body, bytes) else bytes(body, "utf-8")),
                    )
                    for raw_id, namespace, idc, name, created_at, body in rows
                ]
        finally:
            await cursor.close()

    async def _insert(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        # Many rows per statement: SQLite then inserts them without taking Python's lock back for every
        # row (each step of an executemany waits for it, and the file is being parsed meanwhile).
        per = self.ROWS_PER_INSERT
        head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
        row = f"({_placeholders(len(columns))})"
        whole = len(rows) - len(rows) % per
        if whole:
            await self.driver.executemany(
                head + ",".join([row] * per),
                [tuple(itertools.chain.from_iterable(rows[i : i + per])) for i in range(0, whole, per)],
            )
        if whole < len(rows):
            rest = rows[whole:]
            values = tuple(itertools.chain.from_iterable(rest))
            await self.driver.execute(head + ",".join([row] * len(rest)), values)

    async def create(self, writes: list[Write], revision: int, now: dt.datetime, actor: Actor) -> None:
        await self._insert("images", IMAGE_COLUMNS, self.image_rows(writes, revision, now))
        changes = [(w.image_id, w.body.decode()) for w in writes]
        await self._insert(
            "audit_log", AUDIT_COLUMNS, self.audit_rows(now, revision, "create", actor, changes)
        )

    async def update(self, writes: list[Write], revision: int, now: dt.datetime) -> None:
        rows = self.image_rows(writes, revision, now)  # a None created_at keeps the stored one
        sets = ", ".join(
            f"{name} = COALESCE(?, created_at)" if name == "created_at" else f"{name} = ?"
            for name in IMAGE_COLUMNS[1:]
        )
        await self.driver.executemany(
            f"UPDATE images SET {sets} WHERE id = ?", [(*row[1:], row[0]) for row in rows]
        )

    async def bodies(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        found: dict[uuid.UUID, bytes] = {}
        for start in range(0, len(ids), ID_BATCH):
            chunk = [self.uuid(i) for i in ids[start : start + ID_BATCH]]
            sql = f"SELECT id, body FROM images WHERE id IN ({_placeholders(len(chunk))})"
            for raw_id, body in await self.driver.execute_fetchall(sql, chunk):
                found[uuid.UUID(raw_id)] = bytes(body)
        return found

    async def move_away(self, ids: list[uuid.UUID]) -> None:
        await self.driver.executemany(
            "UPDATE images SET name = ? WHERE id = ?", [(f"~{i}", self.uuid(i)) for i in ids]
        )

    async def delete(self, ids: list[uuid.UUID], revision: int) -> list[tuple[uuid.UUID, bytes]]:
        gone: list[tuple[uuid.UUID, bytes]] = []
        for start in range(0, len(ids), ID_BATCH):
            chunk = [self.uuid(i) for i in ids[start : start + ID_BATCH]]
            marks = _placeholders(len(chunk))
            rows = await self.driver.execute_fetchall(
                f"DELETE FROM images WHERE id IN ({marks}) RETURNING id, body", chunk
            )
            gone += [(uuid.UUID(raw_id), bytes(body)) for raw_id, body in rows]
            await self.driver.execute(f"DELETE FROM deleted_images WHERE id IN ({marks})", chunk)
            await self.driver.executemany(
                "INSERT INTO deleted_images (id, revision) VALUES (?, ?)", [(i, revision) for i in chunk]
            )
        return gone

    async def audit(self, rows: list[tuple[Any, ...]]) -> None:
        await self._insert("audit_log", AUDIT_COLUMNS, rows)


def _sqlite_time(value: Any) -> dt.datetime:
    # SQLAlchemy keeps naive UTC as "YYYY-MM-DD HH:MM:SS.ffffff" on SQLite
    parsed = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


_UPDATES = "cluster_engine_catalog_updates"


def _pg_type(column: sa.Column[Any], dialect: sa.Dialect) -> str:
    """The column's type as psycopg names it (for binary COPY)."""
    name = column.type.compile(dialect=dialect).lower()
    # JSON columns are given their text (json's binary form is its text)
    known = {"timestamp with time zone": "timestamptz", "bigint": "int8", "json": "text"}
    return known.get(name, name.split("(")[0])


class _Postgres(_Database):
    """Binary COPY for every bulk write; updates go through a temporary table."""

    updates_table = False

    async def index_rows(self) -> AsyncIterator[list[tuple[Any, ...]]]:
        async with self.driver.cursor(name="cluster_engine_catalog_index") as cursor:
            await cursor.execute("SELECT id, namespace, idc, name, created_at, md5(body) FROM images")
            while rows := await cursor.fetchmany(10000):
                yield [
                    (image_id.int, namespace, idc, name, created_at, bytes.fromhex(digest))
                    for image_id, namespace, idc, name, created_at, digest in rows
                ]

    async def _copy(self, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> None:
        # binary: a quarter of the client's work of the text format (bytea above all)
        source = audit_log if table == "audit_log" else images  # (the updates table is images' twin)
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        async with self.driver.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types([_pg_type(source.c[name], self.dialect) for name in columns])
            for row in rows:
                await copy.write_row(row)

    async def create(self, writes: list[Write], revision: int, now: dt.datetime, actor: Actor) -> None:
        await self._copy("images", IMAGE_COLUMNS, self.image_rows(writes, revision, now))
        changes = [(w.image_id, w.body.decode()) for w in writes]
        await self._copy("audit_log", AUDIT_COLUMNS, self.audit_rows(now, revision, "create", actor, changes))

    async def update(self, writes: list[Write], revision: int, now: dt.datetime) -> None:
        if not self.updates_table:
            await self.driver.execute(
                f"CREATE TEMPORARY TABLE {_UPDATES} ON COMMIT DROP AS SELECT * FROM images WITH NO DATA"
            )
            self.updates_table = True
        else:
            await self.driver.execute(f"TRUNCATE {_UPDATES}")
        await self._copy(_UPDATES, IMAGE_COLUMNS, self.image_rows(writes, revision, now))
        sets = ", ".join(
            "created_at = COALESCE(u.created_at, i.created_at)"
            if name == "created_at"
            else f"{name} = u.{name}"
            for name in IMAGE_COLUMNS[1:]
        )
        await self.driver.execute(f"UPDATE images AS i SET {sets} FROM {_UPDATES} AS u WHERE i.id = u.id")

    async def bodies(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        cursor = await self.driver.execute("SELECT id, body FROM images WHERE id = ANY(%s)", (ids,))
        return {image_id: bytes(body) for image_id, body in await cursor.fetchall()}

    async def move_away(self, ids: list[uuid.UUID]) -> None:
        await self.driver.execute("UPDATE images SET name = '~' || id::text WHERE id = ANY(%s)", (ids,))

    async def delete(self, ids: list[uuid.UUID], revision: int) -> list[tuple[uuid.UUID, bytes]]:
        cursor = await self.driver.execute("DELETE FROM images WHERE id = ANY(%s) RETURNING id, body", (ids,))
        gone = [(image_id, bytes(body)) for image_id, body in await cursor.fetchall()]
        await self.driver.execute("DELETE FROM deleted_images WHERE id = ANY(%s)", (ids,))
        await self.driver.execute(
            "INSERT INTO deleted_images (id, revision) SELECT unnest(%s::uuid[]), %s", (ids, revision)
        )
        return gone

    async def audit(self, rows: list[tuple[Any, ...]]) -> None:
        await self._copy("audit_log", AUDIT_COLUMNS, rows)


class _Writes:
    """Batches the planned writes and their audit rows. A batch's statements run while the next batch
    is read and planned (one batch in flight at a time, in order): the database works on one core while
    the file is parsed on the other."""

    def __init__(self, db: _Database, revision: int, actor: Actor, now: dt.datetime) -> None:
        self.db, self.revision, self.actor, self.now = db, revision, actor, now
        self.creates: list[Write] = []
        self.updates: list[Write] = []
        self.in_flight: asyncio.Future[None] | None = None

    async def add(self, write: Write) -> None:
        if write.kind == "create":
            self.creates.append(write)
            if len(self.creates) >= CREATE_BATCH:
                await self._start(self._creates())
        else:
            self.updates.append(write)
            if len(self.updates) >= UPDATE_BATCH:
                await self._start(self._updates())

    async def _start(self, job: Coroutine[Any, Any, None]) -> None:
        await self.wait()
        self.in_flight = asyncio.ensure_future(job)
        await asyncio.sleep(0)  # let it send its first statement

    async def wait(self) -> None:
        """Until the batch in flight is written (raising what it raised)."""
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            await in_flight

    async def abandon(self) -> None:
        """The import failed: let the batch in flight end before the transaction is rolled back."""
        with contextlib.suppress(Exception):
            await self.wait()

    def _creates(self) -> Coroutine[Any, Any, None]:
        writes, self.creates = self.creates, []

        async def job() -> None:
            if writes:
                await self.db.create(writes, self.revision, self.now, self.actor)

        return job()

    def _updates(self) -> Coroutine[Any, Any, None]:
        writes, self.updates = self.updates, []
        db, revision, now, actor = self.db, self.revision, self.now, self.actor

        async def job() -> None:
            if not writes:
                return
            before = await db.bodies([w.image_id for w in writes])
            await db.update(writes, revision, now)
            decode = msgspec.json.decode
            diffs = [
                (w.image_id, json.dumps(_diff(decode(before[w.image_id]), decode(w.body)))) for w in writes
            ]
            await db.audit(db.audit_rows(now, revision, "update", actor, diffs))

        return job()

    async def flush(self) -> None:
        await self.wait()
        await self._creates()
        await self._updates()

    async def finish(self, plan: Plan, progress: Progress) -> None:
        await self.flush()
        db, revision, now, actor = self.db, self.revision, self.now, self.actor
        if plan.deleted:
            progress.phase(f"catalog import: deleting {len(plan.deleted):,} images")
        for start in range(0, len(plan.deleted), CREATE_BATCH):
            gone = await db.delete(plan.deleted[start : start + CREATE_BATCH], revision)
            # a delete records what was removed
            await db.audit(
                db.audit_rows(now, revision, "delete", actor, [(i, body.decode()) for i, body in gone])
            )
        moved = [w.image_id for w in plan.deferred if w.kind == "update"]
        for start in range(0, len(moved), CREATE_BATCH):
            await db.move_away(moved[start : start + CREATE_BATCH])
        for write in plan.deferred:
            await self.add(write)
        await self.flush()


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        key: {"from": before.get(key), "to": value}
        for key, value in after.items()
        if before.get(key) != value
    }


# ---------------------------------------------------------------------------------------------- importing


async def import_entries(
    store: Store,
    entries: Iterable[CatalogEntry],
    *,
    dry_run: bool = False,
    prune: bool = False,
    actor: Actor | None = None,
    progress: Progress = QUIET,
) -> ImportReport:
    """Import entries validated already (``read_catalog_entries``)."""
    return await _import(
        store, enumerate(entries), dry_run=dry_run, prune=prune, actor=actor, progress=progress
    )


async def import_source(
    store: Store,
    source: CatalogSource,
    *,
    dry_run: bool = False,
    prune: bool = False,
    actor: Actor | None = None,
    progress: Progress = QUIET,
) -> ImportReport:
    """Import a catalog file (JSON streamed, YAML read whole), validating entry by entry. Raises
    CatalogFileError (not JSON nor YAML), CatalogInvalid (the entries' problems) or Conflict."""
    try:
        return await _import(
            store, _validated(source, progress), dry_run=dry_run, prune=prune, actor=actor, progress=progress
        )
    except _NotJson as problem:
        source = source.as_yaml(problem)
        return await _import(
            store, _validated(source, progress), dry_run=dry_run, prune=prune, actor=actor, progress=progress
        )


class _Invalid:
    """Stands for an entry that failed validation; its problems are in ``problems``."""

    def __init__(self, problems: list[ValidationDetail]) -> None:
        self.problems = problems


def _validated(source: CatalogSource, progress: Progress) -> Iterator[tuple[int, CatalogEntry | _Invalid]]:
    size = source.size
    for position, item in enumerate(source.items()):
        if type(item) is CatalogEntry:
            yield position, item
        else:
            problems: list[ValidationDetail] = []
            entry = read_catalog_entry(item, position, problems)
            yield position, (entry if entry is not None else _Invalid(problems))
        if position % 4096 == 0:
            share = f" ({100 * source.position / size:.0f}%)" if size else ""
            progress.update(f"{position:,} entries{share}")


async def _import(
    store: Store,
    entries: Iterable[tuple[int, CatalogEntry | _Invalid]],
    *,
    dry_run: bool,
    prune: bool,
    actor: Actor | None,
    progress: Progress,
) -> ImportReport:
    import sqlite3

    import psycopg
    from sqlalchemy.exc import IntegrityError

    from .store import Actor, ImportReport, utcnow

    actor = actor or Actor(org_id=None, name="cli:catalog-import")
    report = ImportReport()
    problems = _Problems()
    try:
        async with store.engine.begin() as conn:
            revision = await store._bump(conn)
            db = await _database(conn)
            await db.prepare()
            writes: _Writes | None = None
            gc.freeze()  # what is there now lives until the end: keep the collector off it
            # the database's thread (SQLite) gets Python's lock back soon after each statement step,
            # instead of waiting out the default 5 ms while the file is parsed
            # an import allocates millions of short-lived objects and no cycles worth collecting before
            # it ends: the collector's passes over them cost a fifth of its time
            collecting = gc.isenabled()
            gc.disable()
            switch = sys.getswitchinterval()
            sys.setswitchinterval(min(switch, 0.0005))
            try:
                progress.phase("catalog import: reading the stored images")
                index = await db.load_index(progress)
                gc.freeze()
                now = utcnow()
                planner = Planner(index, report, prune=prune, now=now)
                writes = _Writes(db, revision, actor, now)
                progress.phase("catalog import: importing")
                for position, entry in entries:
                    if isinstance(entry, _Invalid):
                        problems.extend(entry.problems)
                        planner.skip()
                        continue
                    write = planner.add(position, entry)
                    if write is not None:
                        await writes.add(write)
                    if not position % 256:
                        await asyncio.sleep(0)  # the batch in flight goes on to its next statement
                if problems:
                    raise problems.error()
                plan = planner.finish()
                del planner, index  # the bulk of the memory an import holds
                gc.unfreeze()
                if not (report.created or report.updated or report.deleted):
                    await conn.rollback()
                    return report
                progress.phase("catalog import: writing")
                await writes.finish(plan, progress)
            finally:
                sys.setswitchinterval(switch)
                gc.unfreeze()
                if collecting:
                    gc.enable()
                if writes is not None:
                    await writes.abandon()
                await db.done()
            if dry_run:  # everything ran, constraints included; now undo it
                await conn.rollback()
                return report
            progress.phase("catalog import: committing")
            report.revision = revision
    except (IntegrityError, sqlite3.IntegrityError, psycopg.errors.UniqueViolation) as exc:
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" not in str(exc):
            raise
        raise Conflict(DUPLICATE) from None
    finally:
        progress.close()
    return report


async def _database(conn: AsyncConnection) -> _Database:
    driver = (await conn.get_raw_connection()).driver_connection
    if conn.dialect.name == "postgresql":
        return _Postgres(driver, conn.dialect)
    return _Sqlite(driver, conn.dialect)


# ---------------------------------------------------------------------------------------------- exporting


async def export_catalog(
    store: Store,
    out: BinaryIO,
    *,
    output: Literal["json", "yaml"],
    image_type: ImageType | None = None,
    progress: Progress = QUIET,
) -> int:
    """Write the catalog to ``out`` as a catalog file (the list of served images in (createdAt, id) order,
    of ``image_type`` only when given); the number of images written."""
    query = sa.select(images.c.body).order_by(images.c.created_at, images.c.id)
    count = sa.select(sa.func.count()).select_from(images)
    if image_type is not None:
        query = query.where(images.c.type == image_type.value)
        count = count.where(images.c.type == image_type.value)
    writer: _JsonList | _YamlList = _JsonList(out) if output == "json" else _YamlList(out)
    try:
        async with store.engine.connect() as conn:
            total = int(await conn.scalar(count) or 0) if progress.enabled else 0
            progress.phase("catalog export")
            result = await conn.stream(query.execution_options(yield_per=2000))
            async for rows in result.partitions():
                writer.write([bytes(row[0]) for row in rows])
                progress.update(f"{writer.count:,} of {total:,} images")
        writer.close()
    finally:
        progress.close()
    return writer.count


class _JsonList:
    """``json.dumps(images, indent=2)`` plus a newline, written image by image."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.count = out, 0

    def write(self, bodies: list[bytes]) -> None:
        parts = []
        for body in bodies:
            parts.append(b",\n" if self.count else b"[\n")
            parts.append(_json_item(body))
            self.count += 1
        self.out.write(b"".join(parts))

    def close(self) -> None:
        self.out.write(b"\n]\n" if self.count else b"[]\n")


def _json_item(body: bytes) -> bytes:
    """One image of the list, as ``json.dumps(…, indent=2)`` renders it inside the list."""
    if body.isascii() and b"\x7f" not in body:  # what json.dumps escapes (ensure_ascii) is not there
        text = msgspec.json.format(body, indent=2)
    else:
        text = json.dumps(json.loads(body), indent=2).encode()
    return b"  " + text.replace(b"\n", b"\n  ")


# Entries whose strings are printable ASCII (no escapes other than \" and \\ in the JSON) come out of
# libyaml's emitter exactly as out of PyYAML's (Python) one, which is what yaml.safe_dump uses; the rest
# go through PyYAML's.
_YAML_UNSAFE = re.compile(rb'[^\x20-\x7e]|\\[^"\\]')
_FAST_DUMPER: Any = getattr(yaml, "CSafeDumper", None)


class _YamlList:
    """``yaml.safe_dump(images, sort_keys=False, allow_unicode=True)``, written a batch at a time (the
    list's items are independent: a block list of N items is the N one-item lists one after another)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.count = out, 0

    def write(self, bodies: list[bytes]) -> None:
        run: list[Any] = []
        for body in bodies:
            entry = msgspec.json.decode(body)
            if _FAST_DUMPER is not None and not _YAML_UNSAFE.search(body):
                run.append(entry)
                continue
            self._dump(run, _FAST_DUMPER)
            run = []
            self._dump([entry], yaml.SafeDumper)
        self._dump(run, _FAST_DUMPER)
        self.count += len(bodies)

    def _dump(self, entries: list[Any], dumper: Any) -> None:
        if entries:
            text = yaml.dump(entries, Dumper=dumper, sort_keys=False, allow_unicode=True)
            self.out.write(text.encode("utf-8"))

    def close(self) -> None:
        if not self.count:
            self.out.write(b"[]\n")
