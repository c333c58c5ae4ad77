"""The import's plan, without I/O: the index of stored images and, per entry, create, update or unchanged."""

from __future__ import annotations

import array
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ...rules.catalog_entries import CatalogEntry
from ...rules.fields import detail
from ...schemas import ImageType, ValidationDetail, json_encoder
from ..errors import Duplicate
from ..records import DUPLICATE, PUBLIC_NAMESPACE, make_image
from .shared import (
    _EPOCH,
    CatalogInvalid,
    _micros,
    _Problems,
    body_digest,
    identity_key,
)

if TYPE_CHECKING:
    from ..records import ImportReport


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
            last = _seen_before(by_id, self.id_seen, self.new_ids, image_int, position)
            if last >= 0:
                self.duplicates.add(
                    detail(f"[{position}].id", "unique", f"Same id as entry {last}.", str(entry.id))
                )
        holder = index.slot_of_identity.get(key)  # the stored image with this identity now
        last = _seen_before(holder, self.identity_seen, self.new_identities, key, position)
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
            raise Duplicate(f"{spec.idc}/{spec.name}: {DUPLICATE}")
        deferred = [write for write, _ in self.deferred]
        deferred.sort(key=lambda write: write.kind == "create")
        return Plan(deleted=deleted, deferred=deferred)


def _render(image_id: uuid.UUID, entry: CatalogEntry, created_at: dt.datetime) -> bytes:
    """The image's body: what ``records.make_image`` serves, encoded."""
    return _encode(make_image(image_id, entry.type, entry.spec, created_at))


_encode = json_encoder.encode


def _seen_before(
    slot: int | None, stored_seen: array.array[int], new_seen: dict[int, int], key: int, position: int
) -> int:
    """The last entry before ``position`` that named this id or identity (-1: none), and now ``position``:
    kept per stored image (``slot``) in ``stored_seen``, else by ``key`` in ``new_seen``."""
    if slot is not None:
        last, stored_seen[slot] = stored_seen[slot], position
        return last
    last = new_seen.get(key, -1)
    new_seen[key] = position
    return last
