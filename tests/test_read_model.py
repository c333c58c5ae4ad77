"""The read model under many orgs: coalesced cold loads, warm starts, and invalidation by visible set.

In process over the property tests' ``FakeStore`` (counting its calls), then against real SQLite and
PostgreSQL for the store's side of the same contract (one statement per batch of orgs, warm-start batches
that keep an org whole).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cluster_engine.rules.catalog_entries import read_catalog_entries
from cluster_engine.schemas import ImageCreateReq, ImageResp, ImageType
from cluster_engine.server.compact import BodyCodec
from cluster_engine.server.errors import Unavailable
from cluster_engine.server.readmodel import Catalog, loading
from cluster_engine.server.validation import ListQuery
from cluster_engine.storage.records import PUBLIC_NAMESPACE, Actor, Namespace
from cluster_engine.testing.stores import opened_store

from .conftest import STORES, Databases
from .test_properties import BASE, FakeStore, version

ORG_COUNT = 40
ACTOR = Actor(None, "test")


def org(n: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"org-{n}")


def image(
    n: int, owner: uuid.UUID, kind: ImageType = ImageType.CUSTOMIZED, idc: str = "us-west-1"
) -> ImageResp:
    return msgspec.structs.replace(
        version(uuid.uuid5(uuid.NAMESPACE_URL, f"image-{owner}-{n}"), f"image-{n}", kind),
        orgId=owner,
        idc=idc,
        createdAt=BASE + dt.timedelta(seconds=n),
    )


class CountingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.loads: list[list[str]] = []

    async def load_namespaces(self, namespaces: list[str]) -> Namespace:
        self.loads.append(list(namespaces))
        await asyncio.sleep(0.01)  # a query takes a while: requests arriving meanwhile queue up
        return await super().load_namespaces(namespaces)


def populated(orgs: int = ORG_COUNT, per_org: int = 3) -> CountingStore:
    store = CountingStore()
    store.write(tuple(image(n, org(0), ImageType.PUBLIC) for n in range(2)), ())
    for o in range(1, orgs + 1):
        store.write(tuple(image(n, org(o)) for n in range(per_org)), ())
    return store


async def refreshed() -> tuple[CountingStore, Catalog]:
    """A populated store and a catalog on it, refreshed (it knows the orgs), with no org loaded yet and
    the store's load count at zero."""
    store = populated()
    catalog = Catalog(store)  # type: ignore[arg-type]
    await catalog.refresh()
    store.loads.clear()
    return store, catalog


def names(rendered: Any) -> list[str]:
    return [item["name"] for item in json.loads(rendered.body)]


# ---------------------------------------------------------------------------------------- cold loads


def test_a_burst_of_first_requests_shares_few_queries() -> None:
    async def run() -> None:
        store, catalog = await refreshed()
        shelves = await asyncio.gather(*(catalog.load_org(str(org(o))) for o in range(1, ORG_COUNT + 1)))
        assert [len(shelf) for shelf in shelves] == [3] * ORG_COUNT
        # requests arriving together share one query (the second loader finds nothing left to take)
        assert len(store.loads) == 1
        assert sorted(o for batch in store.loads for o in batch) == sorted(
            str(org(o)) for o in range(1, ORG_COUNT + 1)
        )

    asyncio.run(run())


def test_loads_never_wait_behind_a_batch_larger_than_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "LOAD_BATCH", 4)

    async def run() -> None:
        store, catalog = await refreshed()
        await asyncio.gather(*(catalog.load_org(str(org(o))) for o in range(1, ORG_COUNT + 1)))
        assert max(len(batch) for batch in store.loads) == 4
        assert catalog.held()["orgs"] == ORG_COUNT

    asyncio.run(run())


def test_a_queue_of_loads_longer_than_the_deadline_is_no_503_while_each_query_is_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deadline bounds the database's answer, not the wait behind other orgs' loads: 40 orgs one per
    batch (two queries at a time) take 20 queries' time in all, more than the (shortened) deadline, and
    every one of them is served. Each query takes 0.01 s, 15 times less than the deadline, so that a
    loaded machine's late timers do not make one query miss it (it failed once at 0.03 s)."""
    monkeypatch.setattr(loading, "LOAD_BATCH", 1)
    monkeypatch.setattr(loading, "CONCURRENT_LOADS", 2)
    monkeypatch.setattr(loading, "REFRESH_TIMEOUT", 0.15)

    async def run() -> None:
        store = populated()
        catalog = Catalog(store)  # type: ignore[arg-type]
        await catalog.refresh()
        started = asyncio.get_running_loop().time()
        shelves = await asyncio.gather(*(catalog.load_org(str(org(o))) for o in range(1, ORG_COUNT + 1)))
        assert asyncio.get_running_loop().time() - started > 0.15
        assert [len(shelf) for shelf in shelves] == [3] * ORG_COUNT

    asyncio.run(run())


def test_a_failed_batch_answers_every_waiter_unavailable_and_the_next_request_retries() -> None:
    class Failing(CountingStore):
        fail = False

        async def load_namespaces(self, namespaces: list[str]) -> Namespace:
            if self.fail:
                raise OSError("connection refused")
            return await super().load_namespaces(namespaces)

    async def run() -> None:
        store = Failing()
        store.write((image(0, org(1)),), ())
        catalog = Catalog(store)  # type: ignore[arg-type]
        await catalog.refresh()
        store.fail = True
        outcomes = await asyncio.gather(
            *(catalog.load_org(str(org(1))) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(o, Unavailable) for o in outcomes)
        store.fail = False
        assert len(await catalog.load_org(str(org(1)))) == 1

    asyncio.run(run())


# ---------------------------------------------------------------------------------------- warm start


def test_preload_holds_every_org_and_a_complete_catalog_needs_no_query_for_others() -> None:
    async def run() -> None:
        store, catalog = await refreshed()
        await catalog.preload(batch=7)
        assert catalog.complete and catalog.held() == {
            "Public": 2,
            "Customized": 3 * ORG_COUNT,
            "orgs": ORG_COUNT,
        }
        stranger = str(uuid.uuid4())
        own = catalog.held_view(stranger)
        assert own is not None and len(own) == 0
        assert names(own.list(ListQuery(None, None))) == ["image-0", "image-1"]
        # a new org's first image arrives through the changes: held, since the catalog is complete
        newcomer = uuid.uuid4()
        store.write((image(9, newcomer),), ())
        await catalog.refresh()
        shelf = catalog.held_view(str(newcomer))
        assert shelf is not None and len(shelf) == 1
        assert store.loads == []

    asyncio.run(run())


def test_preload_stops_at_the_bounds_with_whole_orgs_and_the_rest_load_on_first_use() -> None:
    async def run() -> None:
        store = populated()
        catalog = Catalog(store, max_images=10)  # type: ignore[arg-type]
        await catalog.refresh()
        await catalog.preload(batch=2)
        assert not catalog.complete
        assert catalog.held()["Customized"] == 9  # three whole orgs of three; a fourth would not fit
        unheld = [str(org(o)) for o in range(1, ORG_COUNT + 1) if catalog.held_view(str(org(o))) is None]
        assert len(unheld) == ORG_COUNT - 3
        assert len(await catalog.load_org(unheld[0])) == 3

    asyncio.run(run())


def test_eviction_ends_completeness() -> None:
    async def run() -> None:
        store = populated(orgs=3)
        catalog = Catalog(store, max_images=9)  # type: ignore[arg-type]
        await catalog.refresh()
        await catalog.preload()
        assert catalog.complete
        store.write((image(5, org(1)),), ())  # a tenth image: some org must go
        await catalog.refresh()
        assert not catalog.complete and catalog.held()["Customized"] <= 9

    asyncio.run(run())


# --------------------------------------------------------------------------------------- invalidation


def test_a_customized_write_drops_only_that_orgs_answers() -> None:
    async def run() -> None:
        store = populated(orgs=2)
        catalog = Catalog(store)  # type: ignore[arg-type]
        await catalog.refresh()
        await catalog.preload()
        a, b = str(org(1)), str(org(2))
        view_a, view_b = catalog.held_view(a), catalog.held_view(b)
        assert view_a is not None and view_b is not None
        west = ListQuery("us-west-1", None)
        answer_a, answer_b = view_a.list(west), view_b.list(west)
        store.write((image(7, org(1)),), ())
        await catalog.refresh()
        assert view_b.list(west) is answer_b  # untouched: still cached
        again_a = view_a.list(west)
        assert again_a is not answer_a and "image-7" in names(again_a)
        store.write((image(8, org(0), ImageType.PUBLIC),), ())  # everyone sees Public images
        await catalog.refresh()
        assert "image-8" in names(view_b.list(west))

    asyncio.run(run())


def test_callers_with_nothing_of_their_own_in_a_selection_share_the_public_answer() -> None:
    async def run() -> None:
        store = populated(orgs=2)
        store.write((image(3, org(2), idc="eu-1"),), ())
        catalog = Catalog(store)  # type: ignore[arg-type]
        await catalog.refresh()
        await catalog.preload()
        view_1, view_2 = catalog.held_view(str(org(1))), catalog.held_view(str(org(2)))
        stranger = catalog.held_view("someone-else")  # complete: known to have nothing of its own
        assert view_1 is not None and view_2 is not None and stranger is not None
        eu = ListQuery("eu-1", None)
        first = view_1.list(eu)
        assert stranger.list(eu) is first
        assert "image-3" in names(view_2.list(eu))

    asyncio.run(run())


# ------------------------------------------------------------------------------------ held bodies


def test_compressed_bodies_serve_the_same_bytes_as_bodies_held_as_they_are() -> None:
    """Customized bodies are compressed once the codec has its sample (here 40 of them): every answer,
    page and item is byte for byte what a catalog holding them as they are serves, before and after
    writes, and the held bodies really are smaller."""

    async def run() -> None:
        store = populated(orgs=30, per_org=5)
        plain = Catalog(store, compress_after=None)  # type: ignore[arg-type]
        packed = Catalog(store, compress_after=40)  # type: ignore[arg-type]
        for catalog in (plain, packed):
            await catalog.refresh()
            await catalog.preload(batch=3)
        assert packed._codec.compressing and not plain._codec.compressing
        customized = [e for e in packed._entries.values() if e.namespace != PUBLIC_NAMESPACE]
        assert sum(e.json[0] != ord("{") for e in customized) == len(customized) - 40

        def same(step: str) -> None:
            for o in range(1, 31):
                caller = str(org(o))
                own_plain, own_packed = plain.held_view(caller), packed.held_view(caller)
                assert own_plain is not None and own_packed is not None
                for idc in (None, "us-west-1", "eu-1"):
                    a = own_plain.list(ListQuery(idc, None))
                    b = own_packed.list(ListQuery(idc, None))
                    assert (a.body, a.etag) == (b.body, b.etag), (step, caller, idc)
                    query = ListQuery(idc=idc, product=None, limit=2)
                    assert own_plain.list(query).body == own_packed.list(query).body
                for entry in customized:
                    if entry.namespace == caller:
                        a_item, b_item = own_plain.get(entry.id), own_packed.get(entry.id)
                        assert a_item is not None and b_item is not None and a_item.body == b_item.body

        same("preloaded")
        store.write((image(50, org(3), idc="eu-1"), image(51, org(0), ImageType.PUBLIC)), ())
        for catalog in (plain, packed):
            await catalog.refresh()
        same("after writes")
        assert (
            sum(len(e.json) for e in customized) < sum(len(plain._entries[e.id].json) for e in customized) / 2
        )

    asyncio.run(run())


def test_a_sample_that_trains_no_dictionary_leaves_bodies_as_they_are() -> None:
    codec = BodyCodec(train_after=3)
    bodies = [b'{"id":"%d"}' % n for n in range(5)]  # far too little to train a dictionary on
    assert [codec.pack(body) for body in bodies] == bodies
    assert not codec.compressing and [codec.unpack(body) for body in bodies] == bodies


# ------------------------------------------------------------------------------------- real databases


def _catalog_entries(orgs: int, per_org: int) -> list[dict[str, Any]]:
    entries = []
    for o in range(orgs + 1):
        for n in range(per_org):
            body = msgspec.to_builtins(image(n, org(o), ImageType.PUBLIC if o == 0 else ImageType.CUSTOMIZED))
            entries.append({**body, "createdAt": body["createdAt"]})
    return entries


@pytest.mark.parametrize("store_kind", STORES)
def test_the_store_loads_many_orgs_in_one_statement_and_warm_starts_in_whole_orgs(
    store_kind: str, databases: Databases, tmp_path: Path
) -> None:
    url = databases.migrated(store_kind, tmp_path)
    entries = _catalog_entries(orgs=12, per_org=5)

    async def run() -> None:
        async with opened_store(url) as store:
            report = await store.import_catalog(read_catalog_entries(entries))
            wanted = [str(org(o)) for o in (3, 4, 11)] + [str(uuid.uuid4())]
            loaded = await store.load_namespaces(wanted)
            assert loaded.revision == report.revision
            got = sorted(json.loads(body)["id"] for body, _ in loaded.images)
            assert got == sorted(e["id"] for e in entries if e["orgId"] in wanted[:3])
            assert all(revision == report.revision for _, revision in loaded.images)
            served = {e["id"]: e for e in entries}
            for body, _ in loaded.images:  # the stored body is the served JSON
                assert json.loads(body) == {
                    **served[json.loads(body)["id"]],
                    "createdAt": json.loads(body)["createdAt"],
                }
            batches = [rows async for _, rows in store.customized(batch=7)]
            seen: list[str] = []
            for rows in batches:
                orgs_here = [namespace for namespace, _ in rows]
                assert orgs_here == sorted(orgs_here)
                assert not set(orgs_here) & set(seen), "an org was split between batches"
                seen += dict.fromkeys(orgs_here)
            assert len(seen) == 12 and sum(len(rows) for rows in batches) == 60

            catalog = Catalog(store)
            await catalog.refresh()
            await catalog.preload(batch=7)
            assert catalog.complete and catalog.held()["Customized"] == 60

    asyncio.run(run())


@pytest.mark.parametrize("store_kind", STORES)
def test_a_write_reaches_the_writing_process_read_model_without_reading_the_database(
    store_kind: str, databases: Databases, tmp_path: Path
) -> None:
    """Read-your-writes through Store.on_commit: the writer's read model holds each create, update and
    delete as soon as it commits, with no query of its own; its revision follows the write when no other
    process wrote in between, and stays (for the next refresh to fetch the gap) when one did."""
    url = databases.migrated(store_kind, tmp_path)
    owner = org(1)

    def spec(name: str) -> ImageCreateReq:
        entry = _catalog_entries(orgs=1, per_org=1)[1]
        fields = {k: v for k, v in entry.items() if k not in ("id", "type", "createdAt")}
        return msgspec.convert({**fields, "name": name, "orgId": str(owner)}, ImageCreateReq)

    async def run() -> None:
        async with opened_store(url) as store, opened_store(url) as other:
            catalog = Catalog(store)
            await catalog.refresh()
            await catalog.preload()
            store.on_commit = catalog.apply_own
            queries = 0

            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal queries
                queries += 1
                raise AssertionError("the read model read the database")

            store.changes_since = counted  # type: ignore[method-assign]
            store.load_namespaces = counted  # type: ignore[method-assign]

            def listed() -> list[str]:
                view = catalog.held_view(str(owner))
                assert view is not None
                return names(view.list(ListQuery(None, None)))

            catalog.confirmed_at = float("-inf")  # a poller that has not confirmed for a long while
            created = await store.create_image(spec("first"), ImageType.CUSTOMIZED, ACTOR)
            assert listed() == ["first"] and catalog.revision == 1
            assert catalog.is_fresh()  # the commit showed the catalog at this revision: confirmed as of then
            await store.update_image(created.id, ACTOR, lambda _: spec("renamed"))
            assert listed() == ["renamed"] and catalog.revision == 2
            assert catalog.get(str(created.id)) is not None

            # another process writes in between: the next own write shows, the revision waits for a refresh
            await other.create_image(spec("theirs"), ImageType.CUSTOMIZED, ACTOR)
            catalog.confirmed_at = float("-inf")
            await store.delete_image(created.id, ACTOR, lambda _: None)
            assert listed() == [] and catalog.revision == 2 and catalog.get(str(created.id)) is None
            assert not catalog.is_fresh() and store.committed_revision == 4
            assert queries == 0

            del store.changes_since, store.load_namespaces  # the real ones again
            await catalog.refresh()
            assert listed() == ["theirs"] and catalog.revision == 4

    asyncio.run(run())
