"""Deterministic catalogs to import: the 800 Public images every benchmark shares, Customized images in
orgs, written as one JSON array (the same arguments give a byte-identical file), and what a caller should
see in them (``CatalogInfo`` for ``run``, ``OrgsCatalog`` for ``orgs``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import random
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .common import BenchError

NAMESPACE = uuid.UUID("6f1d3c1e-2b7a-4c55-9e0f-8a4b2d7c9e11")  # uuid5 namespace of every generated id
SEED = 20260101
ORGS_SEED = 20260202  # the Customized images of bench.orgs (orgs of 80)

IDCS = [
    "us-west-1",
    "us-east-1",
    "us-central-2",
    "eu-west-1",
    "eu-north-1",
    "ap-south-1",
    "ap-east-2",
    "me-1",
]
PRODUCTS = [
    *("gpu.h100.8x", "gpu.h100.4x", "gpu.h200.8x", "gpu.h200.4x", "gpu.b200.8x", "gpu.b200.4x"),
    *("gpu.a100.8x", "gpu.a100.4x", "gpu.l40s.8x", "gpu.l40s.4x", "gpu.gb200.4x", "gpu.mi300x.8x"),
]
N_PUBLIC = 800
PUBLIC_PER_IDC = N_PUBLIC // len(IDCS)
IMAGES_PER_ORG = 20
ORGS_IMAGES_PER_ORG = 80
OPERATOR_ORG = uuid.uuid5(NAMESPACE, "operator")
OS_CHOICES = [
    ("Ubuntu", ["20.04", "22.04", "24.04"]),
    ("Debian", ["11", "12"]),
    ("Rocky", ["8.10", "9.4"]),
    ("AlmaLinux", ["9.4"]),
]
PUBLIC_EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
CUSTOM_EPOCH = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)

Pair = tuple[str, str]  # (idc, product)


def org_id(index: int) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"org-{index}")


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_image(
    rng: random.Random, *, image_id: uuid.UUID, kind: str, org: uuid.UUID, idc: str, name: str, created: str
) -> dict[str, Any]:
    series, versions = OS_CHOICES[rng.randrange(len(OS_CHOICES))]
    version = versions[rng.randrange(len(versions))]
    count = 4 if kind == "Public" else rng.randint(2, 4)
    products = sorted(rng.sample(PRODUCTS, count), key=PRODUCTS.index)
    disk = f"{rng.choice((100, 200, 500))}G"
    return {
        "id": str(image_id),
        "type": kind,
        "orgId": str(org),
        "idc": idc,
        "name": name,
        "path": f"images/{idc}/{name.lower()}.qcow2",
        "OSSeries": series,
        "OSVersion": version,
        "OSArchitecture": "x86_64",
        "BootMode": "UEFI" if rng.random() < 0.9 else "Legacy",
        "SystemDiskSize": disk,
        "DefaultPartitionTable": [
            {"name": "EFI", "mountPoint": "/boot/efi", "size": "512M", "fileSystem": "vfat"},
            {"name": "root", "mountPoint": "/", "size": disk, "fileSystem": "ext4"},
        ],
        "icon": f"https://static.example.com/os-icons/{series.lower()}.svg",
        "supportedProducts": products,
        "createdAt": created,
    }


def public_images() -> Iterator[dict[str, Any]]:
    """The same 800 Public images for every N: 100 per idc, 4 products each (~33 per (idc, product))."""
    rng = random.Random(SEED)
    for index in range(N_PUBLIC):
        yield make_image(
            rng,
            image_id=uuid.uuid5(NAMESPACE, f"public-{index}"),
            kind="Public",
            org=OPERATOR_ORG,
            idc=IDCS[index // PUBLIC_PER_IDC],
            name=f"Public-{index:04d}",
            created=_stamp(PUBLIC_EPOCH + dt.timedelta(hours=index)),
        )


def customized_image(
    index: int, *, seed: int = SEED, per_org: int = IMAGES_PER_ORG, prefix: str = "customized"
) -> dict[str, Any]:
    """Customized image ``index`` (of org ``index // per_org``): the same whatever N is."""
    rng = random.Random(seed * 1_000_003 + index)
    return make_image(
        rng,
        image_id=uuid.uuid5(NAMESPACE, f"{prefix}-{index}"),
        kind="Customized",
        org=org_id(index // per_org),
        idc=IDCS[rng.randrange(len(IDCS))],
        name=f"Custom-{index:07d}",
        created=_stamp(CUSTOM_EPOCH + dt.timedelta(seconds=37 * index)),
    )


def pairs_of(image: dict[str, Any]) -> list[Pair]:
    return [(image["idc"], product) for product in image["supportedProducts"]]


def write_images(path: Path, images: Iterable[dict[str, Any]]) -> int:
    """``images`` as one JSON array, an image a line; returns the file's size in bytes."""
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n")
        for index, image in enumerate(images):
            out.write(("" if index == 0 else ",\n") + json.dumps(image, separators=(",", ":")))
        out.write("\n]\n")
    return path.stat().st_size


def check_size(n: int) -> None:
    if n <= N_PUBLIC:
        raise BenchError(f"catalog size {n} must exceed the {N_PUBLIC} fixed Public images")


def ranked_pairs(public: Counter[Pair], own: Counter[Pair]) -> list[Pair]:
    """The benchmark query first: an (idc, product) where the caller has Customized images too (so the
    public/own merge runs), with a total as close to 30 as possible; deterministic, the same at every N."""
    everything = [(idc, product) for idc in IDCS for product in PRODUCTS]
    return sorted(
        everything,
        key=lambda k: (own[k] == 0, abs(public[k] + own[k] - 30), IDCS.index(k[0]), PRODUCTS.index(k[1])),
    )


# ------------------------------------------------------------------------------------ bench.run


@dataclasses.dataclass(frozen=True)
class CatalogInfo:
    n: int
    path: Path
    size_bytes: int
    org: uuid.UUID  # the benchmark caller: owns Customized images
    idc: str
    product: str
    expected_filtered: int
    expected_unfiltered: int
    public_id: str


def write_catalog(n: int, path: Path) -> CatalogInfo:
    """The N-image catalog of ``bench run``: the Public images, then Customized ones in orgs of 20."""
    check_size(n)
    public: Counter[Pair] = Counter(pair for image in public_images() for pair in pairs_of(image))
    own: Counter[Pair] = Counter()

    def images() -> Iterator[dict[str, Any]]:
        yield from public_images()
        for index in range(n - N_PUBLIC):
            image = customized_image(index)
            if index < IMAGES_PER_ORG:
                own.update(pairs_of(image))
            yield image

    size = write_images(path, images())
    idc, product = ranked_pairs(public, own)[0]
    return CatalogInfo(
        n=n,
        path=path,
        size_bytes=size,
        org=org_id(0),
        idc=idc,
        product=product,
        expected_filtered=public[(idc, product)] + own[(idc, product)],
        expected_unfiltered=N_PUBLIC + min(IMAGES_PER_ORG, n - N_PUBLIC),
        public_id=str(uuid.uuid5(NAMESPACE, "public-0")),
    )


# ----------------------------------------------------------------------------------- bench.orgs


@dataclasses.dataclass(frozen=True)
class OrgsCatalog:
    n: int
    path: Path
    size_bytes: int
    orgs_with: list[uuid.UUID]  # orgs owning Customized images (80 each, the last one maybe fewer)
    orgs_without: list[uuid.UUID]  # as many orgs again, with no Customized image at all
    pairs: list[Pair]  # the (idc, product) of the benchmark query, then the rotated ones
    public: dict[Pair, int]  # Public images per (idc, product)
    own: dict[uuid.UUID, Counter[Pair]]  # Customized images per org and (idc, product)

    @property
    def org(self) -> uuid.UUID:
        """The ``single`` caller."""
        return self.orgs_with[0]

    @property
    def all_orgs(self) -> list[uuid.UUID]:
        return self.orgs_with + self.orgs_without

    def expected(self, org: uuid.UUID, pair: Pair) -> int:
        own = self.own.get(org)
        return self.public.get(pair, 0) + (own[pair] if own else 0)

    @property
    def targets(self) -> list[str]:
        return [f"/v1/images?idc={idc}&product={product}" for idc, product in self.pairs]


def write_orgs_catalog(n: int, path: Path, pairs: int) -> OrgsCatalog:
    """The N-image catalog of ``bench orgs`` (Customized images in orgs of 80, as many orgs without any),
    and what each org should see: the query as in ``write_catalog``, then the next-closest pairs."""
    check_size(n)
    public: Counter[Pair] = Counter(pair for image in public_images() for pair in pairs_of(image))
    own: dict[uuid.UUID, Counter[Pair]] = {}

    def images() -> Iterator[dict[str, Any]]:
        yield from public_images()
        for index in range(n - N_PUBLIC):
            image = customized_image(
                index, seed=ORGS_SEED, per_org=ORGS_IMAGES_PER_ORG, prefix="orgs-customized"
            )
            own.setdefault(uuid.UUID(image["orgId"]), Counter()).update(pairs_of(image))
            yield image

    size = write_images(path, images())
    with_images = math.ceil((n - N_PUBLIC) / ORGS_IMAGES_PER_ORG)
    orgs_with = [org_id(i) for i in range(with_images)]
    return OrgsCatalog(
        n=n,
        path=path,
        size_bytes=size,
        orgs_with=orgs_with,
        orgs_without=[org_id(i) for i in range(with_images, 2 * with_images)],
        pairs=ranked_pairs(public, own[orgs_with[0]])[:pairs],
        public=dict(public),
        own=own,
    )
