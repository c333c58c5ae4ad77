"""Wire types, named exactly as the contract names them (``components/schemas``).

Every Struct shares one base (``Base``) so encoding options live in one place. Field names are the
contract's own spellings (``BootMode``, ``OSSeries``, ``orgId``…), so no renaming layer exists between
what we hold and what clients read.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid

import msgspec


class Base(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    """Shared options: unknown fields are ignored (the contract allows them); defaults stay off the wire."""


class ImageType(enum.StrEnum):
    PUBLIC = "Public"
    CUSTOMIZED = "Customized"


class ImageBootMode(enum.StrEnum):
    UEFI = "UEFI"
    LEGACY = "Legacy"


class Partition(Base):
    """``components/schemas/partition``."""

    name: str
    mountPoint: str
    size: str
    fileSystem: str


class ImageCreateReq(Base):
    """``components/schemas/ImageCreateReq`` (with ``ImageConfig`` folded in), already validated."""

    idc: str
    orgId: uuid.UUID
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


class ImageResp(Base, omit_defaults=False):
    """``components/schemas/ImageResp``: every field is required, so every field is always sent."""

    id: uuid.UUID
    type: ImageType
    orgId: uuid.UUID
    idc: str
    name: str
    path: str
    OSSeries: str
    OSVersion: str
    OSArchitecture: str
    BootMode: ImageBootMode
    SystemDiskSize: str
    DefaultPartitionTable: list[Partition]
    icon: str
    supportedProducts: list[str]
    createdAt: dt.datetime


class ValidationDetail(Base):
    """``components/schemas/validationDetail``."""

    field: str
    expression: str
    reason: str
    originalValue: str
    argument: str | None = None


class ErrorStatusMessage(Base):
    """``components/schemas/errorStatusMessage``: 400 and 401 bodies."""

    code: int
    group: str
    message: str | None = None
    validationDetail: list[ValidationDetail] | None = None


class Error(Base):
    """``components/schemas/error``: every other error body."""

    reason: str


json_encoder = msgspec.json.Encoder()
