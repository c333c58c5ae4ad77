"""Property tests: the read model and the HTTP API agree with a brute-force model of the documented rules.

Documented semantics checked here: a caller sees every Public image plus the Customized images of its own
org; ``idc`` filters by equality, ``product`` by membership in ``supportedProducts``, both by AND; results
are ordered by ``createdAt`` ascending, then ``id`` ascending (canonical lowercase uuid string).

In process, the read model runs over ``FakeStore``: an in-memory stand-in for ``Store`` with the same
contract (``changes_since``, ``load_namespace``; every write takes the next revision and stamps the rows
it touches, deletions leave a tombstone). Each store call reads its answer when called; with ``hold``
set, the answer is delivered only when the test releases it, so tests choose how org loads, refreshes
and writes interleave.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cluster_engine.schemas import ImageBootMode, ImageResp, ImageType, Partition, json_encoder
from cluster_engine.server.errors import Unavailable
from cluster_engine.server.readmodel import Catalog
from cluster_engine.server.validation import ListQuery
from cluster_engine.server.wire import Rendered
from cluster_engine.storage.records import Changes, Namespace, Stored
from cluster_engine.testing import LiveServer
from cluster_engine.testing.samples import image_body, root_only

from .toolkit import fresh_catalog

ORGS = [
    uuid.UUID("11111111-1111-4111-8111-111111111111"),
    uuid.UUID("22222222-2222-4222-8222-222222222222"),
    uuid.UUID("33333333-3333-4333-8333-333333333333"),
]
STRANGER = uuid.UUID("44444444-4444-4444-8444-444444444444")  # never owns anything
CALLERS = [*ORGS, STRANGER]
IDCS = ["us-west-1", "us-east-2", "eu-1"]
PRODUCTS = ["gpu.h100.8x", "gpu.b200.8x", "gpu.l40s.4x", "cpu.small"]
UTC = dt.UTC
BASE = dt.datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
# A small universe of image ids, so writes often update, delete and re-create the same images.
IDS = [uuid.uuid5(uuid.NAMESPACE_URL, f"image-{n}") for n in range(8)]

# Few distinct instants, so ties in createdAt (decided by id) are common, plus arbitrary ones.
created_ats = st.one_of(
    st.sampled_from([BASE, BASE + dt.timedelta(microseconds=1), BASE + dt.timedelta(seconds=1)]),
    st.datetimes(
        min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
products = st.lists(st.sampled_from(PRODUCTS), unique=True, max_size=3)
partitions = st.lists(
    st.builds(
        Partition,
        name=st.sampled_from(["EFI", "root", "data"]),
        mountPoint=st.sampled_from(["/", "/boot/efi", "/data"]),
        size=st.sampled_from(["512M", "200G"]),
        fileSystem=st.sampled_from(["vfat", "ext4", "xfs"]),
    ),
    min_size=1,
    max_size=2,
)
images = st.builds(
    ImageResp,
    id=st.sampled_from(IDS),
    type=st.sampled_from(ImageType),
    orgId=st.sampled_from(ORGS),
    idc=st.sampled_from(IDCS),
    name=st.sampled_from(["Ubuntu-22.04", "Rocky 9", "debian12"]),
    path=st.just("images/disk.qcow2"),
    OSSeries=st.sampled_from(["Ubuntu", "Rocky"]),
    OSVersion=st.just("22.04"),
    OSArchitecture=st.sampled_from(["x86_64", "aarch64"]),
    BootMode=st.sampled_from(ImageBootMode),
    SystemDiskSize=st.just("200G"),
    DefaultPartitionTable=partitions,
    icon=st.just("https://static.example.com/os.svg"),
    supportedProducts=products,
    createdAt=created_ats,
)


# ------------------------------------------------------------------------------------- the fake store


def namespace_of(image: ImageResp) -> str:
    return "public" if image.type is ImageType.PUBLIC else str(image.orgId)


class FakeStore:
    def __init__(self) -> None:
        self.revision = 0
        self.rows: dict[uuid.UUID, tuple[ImageResp, int]] = {}
        self.tombstones: dict[uuid.UUID, int] = {}
        self.hold = False
        self.pending: list[asyncio.Future[None]] = []

    def write(self, upserts: tuple[ImageResp, ...], deletes: tuple[uuid.UUID, ...]) -> None:
        """One committed transaction: the next revision, stamped on every row it touches."""
        self.revision += 1
        for image_id in deletes:
            if self.rows.pop(image_id, None) is not None:
                self.tombstones[image_id] = self.revision
        for image in upserts:
            self.rows[image.id] = (image, self.revision)

    def model(self) -> dict[uuid.UUID, ImageResp]:
        return {image_id: image for image_id, (image, _) in self.rows.items()}

    async def _deliver(self, answer: Any) -> Any:
        if self.hold:
            parked = asyncio.get_running_loop().create_future()
            self.pending.append(parked)
            await parked
        return answer

    def release(self, index: int) -> None:
        if self.pending:
            parked = self.pending.pop(index % len(self.pending))
            if not parked.done():
                parked.set_result(None)

    async def changes_since(self, since: int, upto: int | None = None) -> Changes:
        revision = self.revision if upto is None else upto
        if revision == since:
            return await self._deliver(Changes(revision=since, upserted=[], deleted=[]))  # type: ignore[no-any-return]
        changes = Changes(
            revision=revision,
            upserted=[
                (json_encoder.encode(image), r) for image, r in self.rows.values() if since < r <= revision
            ],
            deleted=[(str(image_id), r) for image_id, r in self.tombstones.items() if since < r <= revision],
        )
        return await self._deliver(changes)  # type: ignore[no-any-return]

    async def load_namespace(self, namespace: str) -> Namespace:
        return await self.load_namespaces([namespace])

    async def load_namespaces(self, namespaces: list[str]) -> Namespace:
        found = [
            (json_encoder.encode(image), r)
            for image, r in self.rows.values()
            if namespace_of(image) in namespaces
        ]
        return await self._deliver(Namespace(revision=self.revision, images=found))  # type: ignore[no-any-return]

    async def customized(self, batch: int = 10_000) -> AsyncIterator[tuple[int, list[tuple[str, Stored]]]]:
        """Every Customized image by org namespace, in batches of about ``batch`` rows that keep an org
        whole, as the real store's warm-start read does."""
        revision = self.revision
        rows = sorted(
            (namespace_of(image), (json_encoder.encode(image), r))
            for image, r in self.rows.values()
            if image.type is ImageType.CUSTOMIZED
        )
        chunk: list[tuple[str, Stored]] = []
        for row in rows:
            if len(chunk) >= batch and chunk[-1][0] != row[0]:
                yield revision, chunk
                chunk = []
            chunk.append(row)
        if chunk:
            yield revision, chunk


async def settle() -> None:
    """Let every runnable task run until it finishes or parks on the store."""
    for _ in range(20):
        await asyncio.sleep(0)


# ------------------------------------------------------------------------------------------ the model


def is_visible(image: ImageResp, org: uuid.UUID) -> bool:
    return image.type is ImageType.PUBLIC or image.orgId == org


def order(image: ImageResp) -> tuple[dt.datetime, str]:
    return (image.createdAt, str(image.id))


def brute_force(
    model: dict[uuid.UUID, ImageResp], org: uuid.UUID, idc: str | None, product: str | None
) -> list[ImageResp]:
    chosen = [
        image
        for image in model.values()
        if is_visible(image, org)
        and (idc is None or image.idc == idc)
        and (product is None or product in image.supportedProducts)
    ]
    return sorted(chosen, key=order)


def expected_json(image: ImageResp) -> dict[str, Any]:
    """The ImageResp as the contract spells it, built by hand (createdAt kept as an instant)."""
    return {
        "id": str(image.id),
        "type": image.type.value,
        "orgId": str(image.orgId),
        "idc": image.idc,
        "name": image.name,
        "path": image.path,
        "OSSeries": image.OSSeries,
        "OSVersion": image.OSVersion,
        "OSArchitecture": image.OSArchitecture,
        "BootMode": image.BootMode.value,
        "SystemDiskSize": image.SystemDiskSize,
        "DefaultPartitionTable": [
            {"name": p.name, "mountPoint": p.mountPoint, "size": p.size, "fileSystem": p.fileSystem}
            for p in image.DefaultPartitionTable
        ],
        "icon": image.icon,
        "supportedProducts": list(image.supportedProducts),
        "createdAt": image.createdAt,
    }


def normalized(item: dict[str, Any]) -> dict[str, Any]:
    """A served image with createdAt parsed, so instants compare regardless of spelling."""
    created = dt.datetime.fromisoformat(item["createdAt"])
    assert created.tzinfo is not None, item["createdAt"]
    return {**item, "createdAt": created}


@dataclass
class Validators:
    """Every (body, etag) pair seen: equal bodies must have equal etags and vice versa."""

    etag_of: dict[bytes, bytes] = field(default_factory=dict)
    body_of: dict[bytes, bytes] = field(default_factory=dict)

    def see(self, rendered: Rendered) -> None:
        body, etag = rendered.body, rendered.etag
        assert self.etag_of.setdefault(body, etag) == etag, "same body, different etag"
        assert self.body_of.setdefault(etag, body) == body, "same etag, different bodies"


async def list_as(catalog: Catalog, org: uuid.UUID, idc: str | None, product: str | None) -> Rendered:
    """What GET /v1/images does once the caller is authenticated and the catalog is fresh."""
    view = await catalog.load_org(str(org))
    return view.list(ListQuery(idc, product))


def check_served(body: list[dict[str, Any]], org: uuid.UUID) -> None:
    """What holds for every answer, fresh or not: visibility, documented order, no duplicates."""
    for item in body:
        assert item["type"] == "Public" or item["orgId"] == str(org), "another org's Customized image"
    keys = [(dt.datetime.fromisoformat(item["createdAt"]), item["id"]) for item in body]
    assert keys == sorted(keys) and len({item["id"] for item in body}) == len(body)


async def check_catalog(catalog: Catalog, store: FakeStore, validators: Validators) -> None:
    """Once quiet and refreshed, every caller's every query equals the brute force over the store."""
    model = store.model()
    expected_items = {image_id: expected_json(image) for image_id, image in model.items()}
    for org in CALLERS:
        for idc in [None, *IDCS, "nowhere"]:
            for product in [None, *PRODUCTS]:
                rendered = await list_as(catalog, org, idc, product)
                body = json.loads(rendered.body)
                want = brute_force(model, org, idc, product)
                assert [normalized(item) for item in body] == [expected_items[i.id] for i in want], (
                    org,
                    idc,
                    product,
                )
                check_served(body, org)
                validators.see(rendered)
                again = await list_as(catalog, org, idc, product)  # from the response cache, if kept
                assert (again.body, again.etag) == (rendered.body, rendered.etag)
        # GET /v1/images/{id}: the caller's view is held, then visibility decides on the namespace
        view = await catalog.load_org(str(org))
        for image_id in [*IDS, uuid.UUID(int=0)]:
            shown = view.get(str(image_id))
            image = model.get(image_id)
            if image is None or not is_visible(image, org):
                assert shown is None, (org, image_id)
            else:
                assert shown is not None, (org, image_id)
                assert normalized(json.loads(shown.body)) == expected_items[image_id]


# ---------------------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Write:
    upserts: tuple[ImageResp, ...]
    deletes: tuple[uuid.UUID, ...]


@dataclass(frozen=True)
class Refresh:
    pass


@dataclass(frozen=True)
class Query:
    org: uuid.UUID
    idc: str | None = None
    product: str | None = None


@dataclass(frozen=True)
class Release:
    index: int


writes = st.builds(
    lambda upserts, deletes: Write(
        tuple(upserts), tuple(i for i in deletes if i not in {image.id for image in upserts})
    ),
    st.lists(images, unique_by=lambda image: image.id, max_size=3),
    st.lists(st.sampled_from(IDS), unique=True, max_size=2),
)
queries = st.builds(
    Query,
    st.sampled_from(CALLERS),
    st.none() | st.sampled_from(IDCS),
    st.none() | st.sampled_from(PRODUCTS),
)
limits = st.fixed_dictionaries(
    {
        "cache_size": st.sampled_from([4096, 2, 0]),
        "max_orgs": st.sampled_from([100_000, 2, 1]),
        "max_images": st.sampled_from([200_000, 3, 1]),
        # bodies held as they are, or compressed once 8 Customized ones trained the dictionary
        "compress_after": st.sampled_from([2000, 8]),
    }
)
# Whether the worker starts warm (``Catalog.preload``, complete when everything fits) or cold.
starts = st.sampled_from(["cold", "preload"])


# --------------------------------------------------------------------------------------- in process


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.one_of(writes, writes, st.just(Refresh()), queries), max_size=14),
    limit=limits,
    start=starts,
    before=st.lists(writes, max_size=3),
)
def test_read_model_matches_brute_force(
    ops: list[Write | Refresh | Query], limit: dict[str, int], start: str, before: list[Write]
) -> None:
    """Writes, refreshes and queries in any order: after every refresh the read model equals the store;
    in between, answers may be stale but are always visible to the caller, ordered and duplicate-free."""

    async def run() -> None:
        store = FakeStore()
        for write in before:  # what the database holds when the worker starts
            store.write(write.upserts, write.deletes)
        catalog = Catalog(store, **limit)  # type: ignore[arg-type]
        validators = Validators()
        await catalog.refresh()
        if start == "preload":
            await catalog.preload(batch=2)
        for op in ops:
            if isinstance(op, Write):
                store.write(op.upserts, op.deletes)
            elif isinstance(op, Refresh):
                await catalog.refresh()
                await check_catalog(catalog, store, validators)
            else:
                rendered = await list_as(catalog, op.org, op.idc, op.product)
                check_served(json.loads(rendered.body), op.org)
                validators.see(rendered)
        await catalog.refresh()
        await check_catalog(catalog, store, validators)
        held = catalog.held()
        assert held["orgs"] <= max(limit["max_orgs"], 1)
        assert held[ImageType.PUBLIC.value] == sum(
            1 for i in store.model().values() if i.type is ImageType.PUBLIC
        )

    asyncio.run(run())


def version(image_id: uuid.UUID, name: str, kind: ImageType = ImageType.CUSTOMIZED) -> ImageResp:
    return ImageResp(
        id=image_id,
        type=kind,
        orgId=ORGS[0],
        idc="us-west-1",
        name=name,
        path="images/disk.qcow2",
        OSSeries="Ubuntu",
        OSVersion="22.04",
        OSArchitecture="x86_64",
        BootMode=ImageBootMode.UEFI,
        SystemDiskSize="200G",
        DefaultPartitionTable=[Partition(name="root", mountPoint="/", size="200G", fileSystem="ext4")],
        icon="https://static.example.com/os.svg",
        supportedProducts=["gpu.h100.8x"],
        createdAt=BASE,
    )


# An org load that read the database before a write lands after the poller skipped that write (the org was
# not held yet) and while the next refresh is in flight: the load rewinds the cursor to its own revision,
# the in-flight refresh then sets it forward again, and the skipped write is never fetched again.
LOST_REWIND = [
    Query(ORGS[0]),  # pending[0]: load_namespace(ORGS[0]) reads (revision 0, no images)
    Write((version(IDS[0], "v1"),), ()),  # revision 1: the org's first Customized image
    Refresh(),  # pending[1]: changes_since(0) = [v1@1]
    Release(1),  # applied while ORGS[0] is not held: v1 skipped; cursor 1
    Refresh(),  # pending[1]: changes_since(1) = nothing new
    Release(0),  # the load lands: ORGS[0] held (empty), cursor rewound to 0
    Release(0),  # the refresh lands: the cursor must stay rewound, or v1 never arrives
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(
    ops=LOST_REWIND,
    limit={"cache_size": 4096, "max_orgs": 100_000, "max_images": 200_000},
    start="cold",
    before=[],
)
@given(
    ops=st.lists(
        st.one_of(writes, st.just(Refresh()), queries, st.builds(Release, st.integers(0, 3))), max_size=20
    ),
    limit=limits,
    start=starts,
    before=st.lists(writes, max_size=3),
)
def test_read_model_converges_whatever_the_interleaving(
    ops: list[Write | Refresh | Query | Release], limit: dict[str, int], start: str, before: list[Write]
) -> None:
    """Org loads, refreshes and writes interleaved in any order (each store answer delivered when the
    test releases it): once everything has landed and one more refresh ran, the read model equals the
    store. This is the property that per-entry revisions and the cursor rewind exist to provide."""

    async def run() -> None:
        store = FakeStore()
        for write in before:  # what the database holds when the worker starts
            store.write(write.upserts, write.deletes)
        catalog = Catalog(store, **limit)  # type: ignore[arg-type]
        await catalog.refresh()
        if start == "preload":
            await catalog.preload(batch=2)
        store.hold = True
        tasks: list[asyncio.Task[Any]] = []
        for op in ops:
            if isinstance(op, Write):
                store.write(op.upserts, op.deletes)
            elif isinstance(op, Refresh):
                tasks.append(asyncio.create_task(catalog.refresh()))
            elif isinstance(op, Query):
                tasks.append(asyncio.create_task(catalog.load_org(str(op.org))))
            else:
                store.release(op.index)
            await settle()
        store.hold = False
        while store.pending:
            store.release(0)
            await settle()
        # Unavailable is a load that outlived its timeout (a 503); any other exception is a bug.
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Unavailable):
                raise outcome
        await catalog.refresh()
        await check_catalog(catalog, store, Validators())

    asyncio.run(run())


def test_ties_in_created_at_are_ordered_by_canonical_id() -> None:
    ids = [uuid.UUID("a" * 32), uuid.UUID("0" * 31 + "1"), uuid.UUID("F" * 32), uuid.UUID("1" * 32)]

    async def run() -> list[str]:
        store = FakeStore()
        store.write(tuple(version(i, f"image-{n}", ImageType.PUBLIC) for n, i in enumerate(ids)), ())
        catalog = Catalog(store)  # type: ignore[arg-type]
        await catalog.refresh()
        return [item["id"] for item in json.loads((await list_as(catalog, ORGS[0], None, None)).body)]

    assert asyncio.run(run()) == sorted(str(i) for i in ids)


def test_created_at_before_year_1000_sorts_first() -> None:
    old = msgspec.structs.replace(
        version(IDS[0], "old", ImageType.PUBLIC), createdAt=dt.datetime(999, 12, 31, tzinfo=UTC)
    )
    new = version(IDS[1], "new", ImageType.PUBLIC)

    async def run() -> list[str]:
        store = FakeStore()
        store.write((new, old), ())
        catalog = Catalog(store)  # type: ignore[arg-type]
        await catalog.refresh()
        return [item["name"] for item in json.loads((await list_as(catalog, ORGS[0], None, None)).body)]

    assert asyncio.run(run()) == ["old", "new"]


# ------------------------------------------------------------------------------------------- over HTTP


@dataclass
class Imported:
    """The shared server (emptied first) and everything imported into it so far (imports never delete)."""

    server: LiveServer
    clients: dict[uuid.UUID, httpx.Client]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id


@pytest.fixture(scope="module")
def imported(shared_server: LiveServer) -> Imported:
    server = fresh_catalog(shared_server)  # the model is every image there is: start from none
    return Imported(server=server, clients={org: server.client(org) for org in CALLERS})


def rfc3339(value: dt.datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


@st.composite
def catalog_files(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Catalog file entries with unique ids and unique (owner, idc, name) identities."""
    ids = draw(st.lists(st.uuids(), unique=True, min_size=1, max_size=8))
    entries = []
    for index, image_id in enumerate(ids):
        kind = draw(st.sampled_from([None, "Public", "Customized"]))
        entry_id = str(image_id) if draw(st.booleans()) else str(image_id).upper()
        owner = draw(st.sampled_from(ORGS))
        idc = draw(st.sampled_from(IDCS))
        name = f"{draw(st.sampled_from(['Ubuntu-22.04', 'Rocky 9']))}-{index}"
        entry = image_body(
            owner,
            name,
            id=entry_id,
            idc=idc,
            path="images/disk.qcow2",
            BootMode=draw(st.sampled_from(["UEFI", "Legacy"])),
            DefaultPartitionTable=root_only(),
            icon="https://static.example.com/os.svg",
            supportedProducts=draw(products),
            createdAt=rfc3339(draw(created_ats)),
        )
        if kind is not None:  # omitted: catalog files default to Public
            entry["type"] = kind
        entries.append(entry)
    return entries


def http_visible(entry: dict[str, Any], org: uuid.UUID) -> bool:
    return bool(entry.get("type", "Public") == "Public" or entry["orgId"] == str(org))


def served_form(entry: dict[str, Any]) -> dict[str, Any]:
    """What the server should answer for a catalog entry (canonical id, default type, parsed instant)."""
    return {
        **entry,
        "id": entry["id"].lower(),
        "type": entry.get("type", "Public"),
        "createdAt": dt.datetime.fromisoformat(entry["createdAt"]),
    }


@pytest.mark.parametrize("shared_server", ["sqlite"], indirect=True)  # the rules do not depend on the store
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    entries=catalog_files(),
    callers=st.lists(st.sampled_from(CALLERS), min_size=1, max_size=3, unique=True),
    product_filters=st.lists(st.sampled_from(PRODUCTS), max_size=2, unique=True),
)
def test_http_list_matches_brute_force(
    imported: Imported, entries: list[dict[str, Any]], callers: list[uuid.UUID], product_filters: list[str]
) -> None:
    # A fresh suffix keeps this example's (owner, idc, name) identities apart from earlier examples'.
    suffix = uuid.uuid4().hex[:8]
    entries = [{**entry, "idc": f"{entry['idc']}-{suffix}"} for entry in entries]
    imported.server.import_catalog(entries)
    for entry in entries:  # an id seen before (hypothesis may reuse one) is updated, not duplicated
        imported.entries[entry["id"].lower()] = served_form(entry)
    model = imported.entries

    idcs = sorted({entry["idc"] for entry in entries})
    for org in callers:
        client = imported.clients[org]
        for idc in [None, *idcs]:
            for product in [None, *product_filters]:
                params = {k: v for k, v in (("idc", idc), ("product", product)) if v is not None}
                response = client.get("/v1/images", params=params)
                assert response.status_code == 200, response.text
                expected = sorted(
                    (
                        e
                        for e in model.values()
                        if http_visible(e, org)
                        and (idc is None or e["idc"] == idc)
                        and (product is None or product in e["supportedProducts"])
                    ),
                    key=lambda e: (e["createdAt"], e["id"]),
                )
                assert [normalized(item) for item in response.json()] == expected, (org, params)
        for entry in entries:
            got = client.get(f"/v1/images/{entry['id']}")
            assert got.status_code == (200 if http_visible(entry, org) else 404), (org, entry["id"])
            if got.status_code == 200:
                assert normalized(got.json()) == model[entry["id"].lower()]
