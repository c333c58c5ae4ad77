"""The revision board: one replica's workers share their change polls (server/revisionboard.py).

The record itself (published, read back, shared across fork, torn records refused); then two read models
over one counting store that share a board, the way two workers of one ``serve`` do; then a real
``serve --workers 3`` on PostgreSQL, whose workers confirm each other (its /metrics) and still serve every
write at once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cluster_engine.schemas import ImageType
from cluster_engine.server.readmodel import Catalog
from cluster_engine.server.revisionboard import REGIONS, RevisionBoard
from cluster_engine.storage.records import Changes
from cluster_engine.testing import LiveServer, image_body

from .conftest import Databases
from .test_properties import FakeStore, version


class CountingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    async def changes_since(self, since: int, upto: int | None = None) -> Changes:
        self.polls += 1
        return await super().changes_since(since, upto)


def test_a_record_reads_back_and_nothing_published_reads_as_none() -> None:
    board = RevisionBoard()
    assert board.read() is None  # zeroed memory fails the check word
    board.publish(41, 1234.5)
    assert board.read() == (41, 1234.5)
    board.publish(42, 1300.25)
    assert board.read() == (42, 1300.25)


def test_a_torn_record_reads_as_none() -> None:
    board = RevisionBoard()
    board.publish(7, 99.0)
    other = RevisionBoard()
    other.publish(8, 100.0)
    # half of one record over the other: what a read during a write, or two writers at once, may see
    board._memory[:8] = other._memory[:8]
    assert board.read() is None


def _publish_in_child(board: RevisionBoard) -> None:
    board.publish(5, 77.0)


def test_processes_forked_after_it_share_the_board() -> None:
    board = RevisionBoard()
    board.publish(3, 10.0)
    child = multiprocessing.get_context("fork").Process(target=_publish_in_child, args=(board,))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert board.read() == (5, 77.0)  # the child's write, seen by its parent


async def _loaded(store: CountingStore, regions: int = REGIONS) -> tuple[Catalog, Catalog, RevisionBoard]:
    """Two workers' read models on one board (``regions`` change regions), each loaded once."""
    board = RevisionBoard(regions=regions)
    first = Catalog(store, board=board)  # type: ignore[arg-type]
    second = Catalog(store, board=board)  # type: ignore[arg-type]
    await first.refresh()
    await second.refresh()
    return first, second, board


def test_a_worker_holding_the_boards_revision_is_confirmed_without_asking_the_database() -> None:
    async def scenario() -> None:
        store = CountingStore()
        store.write((version(uuid.uuid4(), "a", ImageType.PUBLIC),), ())
        first, second, _ = await _loaded(store)
        polls = store.polls
        second.confirmed_at = float("-inf")  # its own confirmation long gone
        before = time.monotonic()
        await first.refresh()  # the first worker's poll publishes (revision, when it asked)
        assert second._look(interval=0.25) == ("board", None)
        assert second.confirmed_at >= before and second.is_fresh()
        assert second._look(interval=0.25) == ("", None)  # nothing more to do until the interval is over
        assert store.polls == polls + 1  # the first worker's poll only

    asyncio.run(scenario())


def test_changes_one_worker_fetched_reach_the_others_without_the_database() -> None:
    async def scenario() -> None:
        store = CountingStore()
        first, second, _ = await _loaded(store)
        added = version(uuid.uuid4(), "new", ImageType.PUBLIC)
        removed = version(uuid.uuid4(), "old", ImageType.PUBLIC)
        store.write((removed,), ())
        await first.refresh()
        await second.refresh()
        store.write((added,), (removed.id,))  # revision 2: one image in, one out
        polls = store.polls
        before = time.monotonic()
        await first.refresh()  # fetched by the first worker, shared on the board
        assert second._look(interval=0.25) == ("shared", None)
        assert store.polls == polls + 1
        assert second.revision == 2 and second.get(str(added.id)) is not None
        assert second.get(str(removed.id)) is None
        assert second.confirmed_at >= before

    asyncio.run(scenario())


def test_a_worker_behind_the_board_with_nothing_shared_fetches_up_to_its_revision() -> None:
    async def scenario() -> None:
        store = CountingStore()
        first, second, board = await _loaded(store, regions=1)  # the second worker cannot share
        assert first._region == 0 and second._region is None
        store.write((version(uuid.uuid4(), "new", ImageType.PUBLIC),), ())
        await second.refresh()  # fetched by the second worker, which has no region to share them in
        seen = board.read()
        assert seen is not None and seen[0] == 1
        assert first._look(interval=10.0) == ("fetched", seen)  # behind the board: due however recent
        await first.refresh(seen=seen)
        assert first.revision == 1 and first.confirmed_at == seen[1]

    asyncio.run(scenario())


def test_an_older_record_over_a_newer_one_confirms_nothing() -> None:
    async def scenario() -> None:
        store = CountingStore()
        _, second, board = await _loaded(store)
        store.write((version(uuid.uuid4(), "newer", ImageType.PUBLIC),), ())
        await second.refresh()  # second at 1, and published it
        board.publish(0, time.monotonic())  # an older record over it
        confirmed = second.confirmed_at
        assert second._look(interval=10.0) == ("", None)  # not confirmed by it: it holds more than 0
        assert second.confirmed_at == confirmed

    asyncio.run(scenario())


def test_a_worker_confirmed_long_ago_asks_the_database_even_with_a_board() -> None:
    async def scenario() -> None:
        store = CountingStore()
        first, second, board = await _loaded(store)
        stale = time.monotonic() - 5.0
        board.publish(0, stale)
        first.confirmed_at = second.confirmed_at = stale
        assert second._look(interval=0.25) == ("database", None)

    asyncio.run(scenario())


def test_a_region_of_a_process_that_is_gone_is_claimed_again() -> None:
    board = RevisionBoard(regions=2)
    child = multiprocessing.get_context("fork").Process(target=board.claim_region)
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert board.claim_region() == 0  # the child's is free again: it is gone
    assert board.claim_region() == 1
    assert board.claim_region() is None  # both taken by live processes


def test_changes_too_large_to_share_are_not_shared() -> None:
    board = RevisionBoard(regions=1)
    region = board.claim_region()
    assert region == 0
    body = b"x" * (300 * 1024)
    assert not board.share_changes(region, 4, Changes(revision=5, upserted=[(body, 5)], deleted=[]), 1.0)
    assert board.changes_from(4) is None
    assert board.share_changes(region, 4, Changes(revision=5, upserted=[(b"{}", 5)], deleted=[("a", 5)]), 2.0)
    found = board.changes_from(4)
    assert found is not None
    changes, at = found
    assert (changes.revision, changes.upserted, changes.deleted, at) == (5, [(b"{}", 5)], [("a", 5)], 2.0)
    assert board.changes_from(3) is None and board.changes_from(5) is None  # not covered: before, after
    board._memory[4096 + 60] ^= 0xFF  # one byte of the payload changed: torn
    assert board.changes_from(4) is None


def _polls(metrics: str, source: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(f'ce_catalog_polls_total{{source="{source}"}}'):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.postgresql
def test_the_workers_of_one_serve_share_their_polls_and_each_serves_a_write_from_elsewhere(
    databases: Databases, tmp_path: Path, demo_org: uuid.UUID
) -> None:
    """``serve --workers 3`` at the default poll interval: some of its workers' polls are confirmed by
    another one's (its /metrics, summed over workers); and a write that none of them made (another
    replica's) is listed by each of them: 12 requests in a row on new connections, sent after the
    freshness bound, all list it (the kernel spreads new connections over the workers)."""
    url = databases.url("postgresql", tmp_path)
    env = {"CE_POLL_INTERVAL": "0.25"}
    with (
        LiveServer.start(tmp_path / "writer", database_url=url, args=["--migrate"]) as writer,
        LiveServer.start(
            tmp_path / "fleet",
            database_url=url,
            env={**env, "CE_JWT_SECRET": writer.secret},
            args=["--workers", "3"],
        ) as replica,
    ):
        deadline = time.monotonic() + 20.0
        # Both counts are awaited: the workers' start-up loads publish to the board too, so the first
        # polls of a replica started under load may all be confirmed by it before any asks the database.
        while True:  # bounded by the deadline
            metrics = httpx.get(f"{replica.url}/metrics", timeout=10).text
            counted = _polls(metrics, "board") >= 3 and _polls(metrics, "database") >= 1
            if counted or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert _polls(metrics, "board") >= 3, metrics
        assert _polls(metrics, "database") >= 1, metrics

        admin = writer.client()
        admin.headers["Authorization"] = f"Bearer {writer.token(demo_org, scopes=['images:admin'])}"
        created = admin.post("/v1/images", json=image_body(demo_org, "from-elsewhere", type="Public"))
        assert created.status_code == 201, created.text
        time.sleep(1.0)  # the freshness bound: from here on every worker must list it
        token = replica.token(demo_org)
        for _ in range(12):
            with httpx.Client(base_url=replica.url, timeout=10) as fresh:  # a new connection each
                listed = fresh.get("/v1/images", headers={"Authorization": f"Bearer {token}"})
            assert listed.status_code == 200, listed.text
            assert "from-elsewhere" in [i["name"] for i in listed.json()]
