"""What the store reads and writes, as values: images as stored (``Stored``), changes and loads, the
actor of a change, an import's report; and the helpers that build an image and its row."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import msgspec

from ..schemas import ImageCreateReq, ImageResp, ImageType, Partition

PUBLIC_NAMESPACE = "public"
IMAGE_NOT_FOUND = "image not found"
DUPLICATE = "an image with this name already exists in this idc for this owner"
NOTIFY_CHANNEL = "cluster_engine_catalog"


def namespace_of(image_type: ImageType, org_id: uuid.UUID) -> str:
    return PUBLIC_NAMESPACE if image_type is ImageType.PUBLIC else str(org_id)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


_image_decoder = msgspec.json.Decoder(ImageResp)


def image_of_body(body: bytes) -> ImageResp:
    """The image as stored in its row's ``body`` (the served JSON)."""
    return _image_decoder.decode(body)


def make_image(
    image_id: uuid.UUID, image_type: ImageType, spec: ImageCreateReq, created_at: dt.datetime
) -> ImageResp:
    """The image as it will be served, from its validated fields (before it is written)."""
    return ImageResp(
        id=image_id,
        type=image_type,
        orgId=spec.orgId,
        idc=spec.idc,
        name=spec.name,
        path=spec.path,
        OSSeries=spec.OSSeries,
        OSVersion=spec.OSVersion,
        OSArchitecture=spec.OSArchitecture,
        BootMode=spec.BootMode,
        SystemDiskSize=spec.SystemDiskSize,
        DefaultPartitionTable=list(spec.DefaultPartitionTable),
        icon=spec.icon,
        supportedProducts=list(spec.supportedProducts),
        createdAt=_utc(created_at),
    )


def image_from_row(row: Any) -> ImageResp:
    return ImageResp(
        id=row.id,
        type=ImageType(row.type),
        orgId=row.org_id,
        idc=row.idc,
        name=row.name,
        path=row.path,
        OSSeries=row.os_series,
        OSVersion=row.os_version,
        OSArchitecture=row.os_architecture,
        BootMode=row.boot_mode,
        SystemDiskSize=row.system_disk_size,
        DefaultPartitionTable=msgspec.convert(row.default_partition_table, list[Partition]),
        icon=row.icon,
        supportedProducts=list(row.supported_products),
        createdAt=_utc(row.created_at),
    )


def _columns(spec: ImageCreateReq) -> dict[str, Any]:
    """The mutable columns of an image, from its validated create request."""
    return {
        "org_id": spec.orgId,
        "idc": spec.idc,
        "name": spec.name,
        "path": spec.path,
        "os_series": spec.OSSeries,
        "os_version": spec.OSVersion,
        "os_architecture": spec.OSArchitecture,
        "boot_mode": spec.BootMode.value,
        "system_disk_size": spec.SystemDiskSize,
        "icon": spec.icon,
        "default_partition_table": msgspec.to_builtins(spec.DefaultPartitionTable),
        "supported_products": list(spec.supportedProducts),
    }


# An image as stored: its served JSON (``images.body``) and the revision that last wrote it.
Stored = tuple[bytes, int]


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed after a given revision, up to and including ``revision``.

    ``upserted`` holds images as they are now, each with the revision that last wrote it; ``deleted``
    the ids deleted with the revision that deleted them. Applying them is idempotent.
    """

    revision: int
    upserted: list[Stored]
    deleted: list[tuple[str, int]]  # (canonical id, revision)


@dataclass(frozen=True, slots=True)
class Namespace:
    """All images of some namespaces (Public, or orgs' Customized) as of at least ``revision``."""

    revision: int
    images: list[Stored]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change, for the audit trail."""

    org_id: uuid.UUID | None
    name: str | None


class Ids(Sequence[uuid.UUID]):
    """Image ids, 16 bytes each (an import's report may hold millions)."""

    def __init__(self, ids: Iterable[uuid.UUID] = ()) -> None:
        self._raw = bytearray()
        self.extend(ids)

    def append(self, image_id: uuid.UUID) -> None:
        self._raw += image_id.bytes

    def extend(self, ids: Iterable[uuid.UUID]) -> None:
        for image_id in ids:
            self._raw += image_id.bytes

    def __len__(self) -> int:
        return len(self._raw) // 16

    @overload
    def __getitem__(self, index: int) -> uuid.UUID: ...
    @overload
    def __getitem__(self, index: slice) -> list[uuid.UUID]: ...
    def __getitem__(self, index: int | slice) -> uuid.UUID | list[uuid.UUID]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return uuid.UUID(bytes=bytes(self._raw[16 * index : 16 * index + 16]))

    def __iter__(self) -> Iterator[uuid.UUID]:
        raw = self._raw
        for start in range(0, len(raw), 16):
            yield uuid.UUID(bytes=bytes(raw[start : start + 16]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{len(self)} image ids>"  # asyncio reprs what a command returns: never list millions


@dataclass(slots=True)
class ImportReport:
    created: Ids = field(default_factory=Ids)
    updated: Ids = field(default_factory=Ids)
    unchanged: Ids = field(default_factory=Ids)
    deleted: Ids = field(default_factory=Ids)
    revision: int | None = None

    def summary(self) -> dict[str, int]:
        return {
            "created": len(self.created),
            "updated": len(self.updated),
            "unchanged": len(self.unchanged),
            "deleted": len(self.deleted),
        }
