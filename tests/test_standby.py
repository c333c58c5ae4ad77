"""Reads from a hot standby (CE_DATABASE_READ_URL): a real primary and a streaming standby made with
pg_basebackup on loopback, and server processes reading from the standby. The freshness promise holds
when the standby lags (replay paused) or is down: a replica serves the new image (its reads go to the
primary) and never the stale list past the bound.

Which server a worker's queries went to is read from the servers' own statement logs (log_statement=all,
with each process's application_name): written as each statement runs, so counting them needs no wait.
Tests that count them make their writes with synchronous_commit=remote_apply (set on their database), so
that a commit is visible on the primary only once the standby applied it: a worker can then never find
the standby behind, and any read of images on the primary would be a bug, not a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster_engine.server.bodies import read_create_request
from cluster_engine.server.config import ConfigError, load_settings
from cluster_engine.storage import db
from cluster_engine.storage.records import Actor
from cluster_engine.storage.standby import Standby
from cluster_engine.storage.store import Store
from cluster_engine.testing import LiveServer
from cluster_engine.testing.pgbouncer import PgBouncer, PgBouncerUnavailable
from cluster_engine.testing.pgserver import PostgresServer, PostgresUnavailable
from cluster_engine.testing.stores import opened_store

from .conftest import IN_CI
from .test_postgres import image_entry

pytestmark = pytest.mark.postgresql

BOUND = 1.0  # CE_FRESHNESS_BOUND's default, which the servers here run with
_ENTRY = re.compile(r"^@([^@]*)@ [A-Z]+:  ", re.MULTILINE)


@dataclass
class Pair:
    primary: PostgresServer
    standby: PostgresServer


@pytest.fixture(scope="module")
def servers() -> Iterator[Pair]:
    """A primary and a hot standby streaming from it. Synchronous standby names are set, but only
    sessions with synchronous_commit=remote_apply wait (the throwaway servers default to off)."""
    settings = {
        "log_statement": "all",
        "log_line_prefix": "@%a@ ",
        "synchronous_standby_names": "*",
    }
    try:
        primary = PostgresServer.start(settings=settings)
    except PostgresUnavailable:
        if IN_CI:
            raise  # CI must run the PostgreSQL tests, never skip them
        pytest.skip("PostgreSQL server binaries not found")
    with primary, PostgresServer.start_standby(primary) as standby:
        yield Pair(primary, standby)


@dataclass
class Database:
    name: str
    primary_url: str
    standby_url: str


@pytest.fixture
def pair(servers: Pair) -> Iterator[Pair]:
    """The module's pair, replaying and up again after each test (whatever the test did to it)."""
    yield servers
    if servers.standby.process is None or servers.standby.process.poll() is not None:
        servers.standby.start_again()
    servers.standby.resume_replay()
    servers.standby.wait_replayed(servers.primary)


def database(pair: Pair, *, remote_apply: bool) -> Database:
    url = pair.primary.create_database()
    db.upgrade(url)
    name = url.rsplit("/", 1)[1]
    if remote_apply:
        pair.primary.query(f'ALTER DATABASE "{name}" SET synchronous_commit = remote_apply')
    pair.standby.wait_replayed(pair.primary)
    return Database(name, url, f"postgresql://postgres@127.0.0.1:{pair.standby.port}/{name}")


def reader_server(directory: Path, database: Database, secret: str | None = None) -> LiveServer:
    """A server process reading from the standby; its connections to both servers carry the
    application_name ``database.name`` (see ``image_reads``)."""
    app = database.name
    env = {"CE_DATABASE_READ_URL": f"{database.standby_url}?application_name={app}"}
    if secret is not None:
        env["CE_JWT_SECRET"] = secret
    return LiveServer.start(directory, database_url=f"{database.primary_url}?application_name={app}", env=env)


@dataclasses.dataclass
class Topology:
    """A fresh database of the pair, a server process on its primary and one reading from its standby
    (with the writer's secret), the writer's admin client for a fresh org and the reader's client for it."""

    database: Database
    reader: LiveServer
    writes: httpx.Client
    client: httpx.Client

    def write_and_see(self, name: str) -> float:
        """Create the Public image ``name`` through the writer; how soon the reader served it (within the
        freshness bound: ``served_within_bound``)."""
        created = self.writes.post("/v1/images", json=public(name))
        assert created.status_code == 201, created.text
        return served_within_bound(self.client, name, time.monotonic())


@contextlib.contextmanager
def writer_and_reader(tmp_path: Path, pair: Pair, *, remote_apply: bool) -> Iterator[Topology]:
    database_ = database(pair, remote_apply=remote_apply)
    org = uuid.uuid4()
    with (
        LiveServer.start(tmp_path / "writer", database_url=database_.primary_url) as writer,
        reader_server(tmp_path / "reader", database_, writer.secret) as reader,
    ):
        yield Topology(database_, reader, admin(writer, org), reader.client(org))


def image_reads(server: PostgresServer, app: str) -> int:
    """Statements of ``app`` that read the images table, in the server's statement log so far."""
    text = server.log_path.read_text(errors="replace")
    starts = list(_ENTRY.finditer(text))
    count = 0
    for at, match in enumerate(starts):
        end = starts[at + 1].start() if at + 1 < len(starts) else len(text)
        if match.group(1) == app and "FROM images" in text[match.start() : end]:
            count += 1
    return count


def admin(server: LiveServer, org: uuid.UUID) -> httpx.Client:
    client = server.client()
    client.headers["Authorization"] = f"Bearer {server.token(org, scopes=['images:admin'])}"
    return client


def public(name: str) -> dict[str, Any]:
    return {**image_entry("sb-1", name), "type": "Public"}


def names(response: httpx.Response) -> set[str]:
    return {image["name"] for image in response.json()}


def served_within_bound(client: httpx.Client, name: str, written: float, timeout: float = 10.0) -> float:
    """Poll the list until ``name`` is in it; every 200 to a request sent more than the bound after the
    write must hold it (a 503 is allowed: the promise is fresh data or none). Returns the delay."""
    deadline = written + timeout
    while time.monotonic() < deadline:
        sent = time.monotonic()
        response = client.get("/v1/images", params={"idc": "sb-1"})
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            if name in names(response):
                return time.monotonic() - written
            assert sent - written <= BOUND, f"stale list served {sent - written:.3f}s after the write"
        time.sleep(0.005)
    raise AssertionError(f"{name} not served within {timeout}s")


def wait_for_log(server: LiveServer, text: str, since: int = 0, timeout: float = 10.0) -> int:
    """Wait until the server's log shows ``text`` after offset ``since``; return the log's length then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if text in log[since:]:
            return len(log)
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not logged within {timeout}s:\n{server.log()[since:][-3000:]}")


def test_a_write_through_one_process_is_served_by_a_standby_reader_within_the_bound(
    pair: Pair, tmp_path: Path
) -> None:
    with writer_and_reader(tmp_path, pair, remote_apply=True) as topology:
        database_ = topology.database
        delays = [topology.write_and_see(f"img-{index}") for index in range(20)]
    print(
        f"standby reader: {len(delays)} writes, median {sorted(delays)[len(delays) // 2] * 1000:.1f} ms, "
        f"max {max(delays) * 1000:.1f} ms"
    )
    assert (
        image_reads(pair.primary, database_.name) == 0
    )  # the reader's polls read every change from the standby
    assert image_reads(pair.standby, database_.name) > 0


def test_polls_and_org_loads_go_to_the_standby_and_own_writes_show_at_once(
    pair: Pair, tmp_path: Path
) -> None:
    database_ = database(pair, remote_apply=True)
    org = uuid.uuid4()
    with reader_server(tmp_path / "reader", database_) as reader:
        loads_before = image_reads(pair.standby, database_.name)
        own = admin(reader, org)
        # read-your-writes on the process that wrote (its write is in its read model at once)
        for index in range(5):
            assert own.post("/v1/images", json=public(f"own-{index}")).status_code == 201
            assert f"own-{index}" in names(own.get("/v1/images", params={"idc": "sb-1"}))
        # another process's write reaches the reader through a poll of the standby
        other = uuid.uuid4()
        asyncio.run(_create_on_primary(database_.primary_url, "theirs", other))
        served_within_bound(reader.client(other), "theirs", time.monotonic())
        newcomer = uuid.uuid4()
        assert reader.client(newcomer).get("/v1/images").status_code == 200
        standby_log = pair.standby.log_path.read_text(errors="replace")
    assert image_reads(pair.primary, database_.name) == 0
    assert image_reads(pair.standby, database_.name) > loads_before
    assert re.search(f"@{database_.name}@ [^@]*namespace = ANY", standby_log)  # an org load


async def _create_on_primary(url: str, name: str, org: uuid.UUID) -> None:
    """A Customized image written by a process of its own (its statements are not the reader's)."""
    async with opened_store(url) as store:
        spec, kind = read_create_request({**image_entry("sb-1", name), "orgId": str(org)})
        await store.create_image(spec, kind, Actor(None, "another process"))


def test_with_replay_paused_a_write_is_served_from_the_primary_and_never_stale(
    pair: Pair, tmp_path: Path
) -> None:
    with writer_and_reader(tmp_path, pair, remote_apply=False) as topology:
        database_, reader = topology.database, topology.reader
        writes, client = topology.writes, topology.client
        topology.write_and_see("before")

        pair.standby.pause_replay()
        mark = len(reader.log())
        assert writes.post("/v1/images", json=public("during")).status_code == 201
        written = time.monotonic()
        delay = served_within_bound(client, "during", written)
        mark = wait_for_log(reader, "the standby is behind the primary", mark)
        # the standby really is behind: it has not applied the write
        rows = pair.standby.query("SELECT count(*) FROM images WHERE name = 'during'", database_.name)
        assert rows == [(0,)]
        # and stays so: later requests keep serving the new image
        until = time.monotonic() + 2 * BOUND
        while time.monotonic() < until:
            response = client.get("/v1/images", params={"idc": "sb-1"})
            assert response.status_code in (200, 503)
            if response.status_code == 200:
                assert "during" in names(response)
            time.sleep(0.02)

        pair.standby.resume_replay()
        pair.standby.wait_replayed(pair.primary)
        wait_for_log(reader, "catalog reads go to the standby again", mark)
        standby_reads = image_reads(pair.standby, database_.name)
        topology.write_and_see("after")
        assert {"before", "during", "after"} <= names(client.get("/v1/images", params={"idc": "sb-1"}))
    print(f"replay paused: the new image was served {delay * 1000:.0f} ms after the write (from the primary)")
    assert image_reads(pair.standby, database_.name) >= standby_reads


def test_with_the_standby_down_reads_go_to_the_primary_and_come_back(pair: Pair, tmp_path: Path) -> None:
    with writer_and_reader(tmp_path, pair, remote_apply=False) as topology:
        database_, reader = topology.database, topology.reader
        topology.write_and_see("before")
        primary_reads = image_reads(pair.primary, database_.name)

        pair.standby.stop("fast")
        mark = len(reader.log())
        delay = topology.write_and_see("down")
        mark = wait_for_log(reader, "the standby failed", mark)
        assert (
            image_reads(pair.primary, database_.name) > primary_reads
        )  # the change was read from the primary

        pair.standby.start_again()
        pair.standby.wait_replayed(pair.primary)
        wait_for_log(reader, "catalog reads go to the standby again", mark)
        topology.write_and_see("back")
    print(f"standby down: the new image was served {delay * 1000:.0f} ms after the write (from the primary)")


@pytest.mark.parametrize("via", ["direct", "pgbouncer"])
def test_a_stores_standby_reads_are_never_behind_what_it_has_seen(
    pair: Pair, tmp_path: Path, via: str
) -> None:
    """The Store itself, reading from the standby directly or through a transaction-pooling PgBouncer
    (READ ONLY transactions): polls, org loads and warm-start loads with replay paused come from the
    primary and hold the newest write; once replay resumes they come from the standby again."""
    database_ = database(pair, remote_apply=False)
    app = database_.name
    org = uuid.uuid4()
    with contextlib.ExitStack() as stack:
        standby_url = f"{database_.standby_url}?application_name={app}"
        if via == "pgbouncer":
            try:
                bouncer = stack.enter_context(PgBouncer.start(pair.standby.port))
            except PgBouncerUnavailable:
                if IN_CI:
                    raise
                pytest.skip("pgbouncer not found (apt-get install pgbouncer)")
            standby_url = bouncer.url(standby_url)
        asyncio.run(_store_reads(pair, database_, standby_url, org))


async def _store_reads(pair: Pair, database_: Database, standby_url: str, org: uuid.UUID) -> None:
    app = database_.name
    primary_url = f"{database_.primary_url}?application_name={app}"
    store = Store(db.create_engine(primary_url), primary_url, standby=Standby.open(standby_url))
    actor = Actor(None, "test")

    async def create(name: str) -> None:
        spec, kind = read_create_request({**image_entry("sb-1", name), "orgId": str(org)})
        await store.create_image(spec, kind, actor)

    def listed(stored: list[tuple[bytes, int]]) -> set[str]:
        return {json.loads(body)["name"] for body, _ in stored}

    try:
        await create("first")
        await asyncio.to_thread(pair.standby.wait_replayed, pair.primary)
        changes = await store.changes_since(0)
        assert listed(changes.upserted) == {"first"}
        primary_reads = image_reads(pair.primary, app)
        assert image_reads(pair.standby, app) > 0 and primary_reads == 0

        await asyncio.to_thread(pair.standby.pause_replay)
        await create("second")
        changes = await store.changes_since(changes.revision)
        assert listed(changes.upserted) == {"second"}  # from the primary: the standby is behind
        assert image_reads(pair.primary, app) > primary_reads
        # an org load and a warm start join a catalog at that revision: from the primary too
        loaded = await store.load_namespaces([str(org)])
        assert loaded.revision >= changes.revision and listed(loaded.images) == {"first", "second"}
        batches = [batch async for batch in store.customized()]
        assert batches[0][0] >= changes.revision
        assert listed([stored for _, rows in batches for _, stored in rows]) == {"first", "second"}
        rows = await asyncio.to_thread(
            pair.standby.query, "SELECT count(*) FROM images WHERE name = 'second'", database_.name
        )
        assert rows == [(0,)]  # the standby really was behind all along

        await asyncio.to_thread(pair.standby.resume_replay)
        await asyncio.to_thread(pair.standby.wait_replayed, pair.primary)
        assert (await store.changes_since(changes.revision)).upserted == []  # and it is current again
        standby_reads, primary_reads = image_reads(pair.standby, app), image_reads(pair.primary, app)
        loaded = await store.load_namespaces([str(org)])
        assert listed(loaded.images) == {"first", "second"}
        assert image_reads(pair.standby, app) > standby_reads
        assert image_reads(pair.primary, app) == primary_reads
    finally:
        await store.close()


def test_a_failing_standby_query_is_answered_from_the_primary(pair: Pair) -> None:
    """An org load's raw query failing on the "standby" (psycopg's own error, not SQLAlchemy's: here a
    database with a catalog_state and no images table) is answered from the primary, and the standby is
    left alone for a while."""
    primary_url = pair.primary.create_database()
    db.upgrade(primary_url)
    broken = pair.primary.create_database()
    name = broken.rsplit("/", 1)[1]
    pair.primary.query("CREATE TABLE catalog_state (id int PRIMARY KEY, revision bigint)", name)
    pair.primary.query("INSERT INTO catalog_state VALUES (1, 1000000)", name)

    async def run() -> tuple[int, bool]:
        standby = Standby.open(broken)
        store = Store(db.create_engine(primary_url), primary_url, standby=standby)
        try:
            loaded = await store.load_namespaces([str(uuid.uuid4())])
            return loaded.revision, standby.usable()
        finally:
            await store.close()

    revision, usable = asyncio.run(run())
    assert revision == 0  # the primary's (a freshly migrated catalog), not the broken one's
    assert not usable


@pytest.mark.parametrize(
    ("database_url", "read_url", "error"),
    [
        ("sqlite:///x.db", "postgresql://ce@standby/ce", "needs a PostgreSQL CE_DATABASE_URL"),
        ("postgresql://ce@primary/ce", "sqlite:///x.db", "must be postgresql://"),
        ("postgresql://ce@primary/ce", "postgresql://ce@primary/ce", "leave it unset"),
        ("postgresql://ce@primary/ce", "postgresql://ce@standby/ce?pgbouncer=maybe", "true or false"),
        (
            "postgresql://ce@primary/ce",
            "postgresql://ce@s1,s2/ce?target_session_attrs=read-write",
            "would read from the primary",
        ),
    ],
)
def test_a_read_url_that_makes_no_sense_is_refused(database_url: str, read_url: str, error: str) -> None:
    env = {"CE_DATABASE_URL": database_url, "CE_DATABASE_READ_URL": read_url}
    with pytest.raises(ConfigError, match=error):
        load_settings(env)


def test_a_standby_read_url_is_accepted() -> None:
    env = {
        "CE_DATABASE_URL": "postgresql://ce@p1,p2/ce?target_session_attrs=read-write",
        "CE_DATABASE_READ_URL": "postgresql://ce@standby:6432/ce?pgbouncer=true",
    }
    assert load_settings(env).database_read_url == env["CE_DATABASE_READ_URL"]
