"""Sample images for tests, drills and benchmarks: one valid image body, varied by keyword.

The same shape serves every place an image is written: a ``POST /v1/images`` body (an ``ImageCreateReq``),
a catalog file entry (the same fields, plus ``type`` and optionally ``id`` / ``createdAt``), and the
``ImageCreateReq`` a storage test hands to the store::

    client.post("/v1/images", json=image_body(org))
    server.import_catalog([image_body(publisher, "Ubuntu-24.04", type="Public")])
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from ..schemas import ImageCreateReq

EFI_PARTITION: dict[str, str] = {
    "name": "EFI",
    "mountPoint": "/boot/efi",
    "size": "512M",
    "fileSystem": "vfat",
}
ROOT_PARTITION: dict[str, str] = {"name": "root", "mountPoint": "/", "size": "199G", "fileSystem": "ext4"}


def image_body(org: uuid.UUID | str, name: Any = "Ubuntu-22.04", **overrides: Any) -> dict[str, Any]:
    """A valid image body owned by ``org``: an Ubuntu 22.04 UEFI image in us-west-1 at
    ``images/<name in lower case>.qcow2`` on 200G with an EFI and a root partition, for two GPU products.
    ``overrides`` replace fields or add others (``type``, ``id``, ``createdAt`` in a catalog entry)."""
    body: dict[str, Any] = {
        "idc": "us-west-1",
        "orgId": str(org),
        "path": f"images/{name}.qcow2".lower(),  # name may be any value, in a test of invalid bodies
        "name": name,
        "OSSeries": "Ubuntu",
        "OSVersion": "22.04",
        "OSArchitecture": "x86_64",
        "BootMode": "UEFI",
        "SystemDiskSize": "200G",
        "DefaultPartitionTable": [dict(EFI_PARTITION), dict(ROOT_PARTITION)],
        "icon": "https://static.example.com/ubuntu.svg",
        "supportedProducts": ["gpu.h100.8x", "gpu.b200.8x"],
    }
    body.update(overrides)
    return body


def root_only(size: str = "200G") -> list[dict[str, str]]:
    """A partition table of one root partition of ``size`` (a Legacy-boot or small image's)."""
    return [{**ROOT_PARTITION, "size": size}]


def image_spec(org: uuid.UUID | str, name: Any = "Ubuntu-22.04", **overrides: Any) -> ImageCreateReq:
    """The same sample as the ``ImageCreateReq`` a storage test hands to ``Store.create_image``."""
    return msgspec.convert(image_body(org, name, **overrides), ImageCreateReq)
