"""PgBouncer in transaction-pooling mode (``pgbouncer=true`` in the URL): what the service does differently
and why. The rest of the PostgreSQL suite runs through PgBouncer too with CE_TEST_VIA_PGBOUNCER=1 (see
conftest.py and .ci/run)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import configparser
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import psycopg
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.engine import make_url

from cluster_engine.schemas import ImageCreateReq, ImageType
from cluster_engine.server.config import ConfigError, load_settings
from cluster_engine.storage import db
from cluster_engine.storage.records import Actor
from cluster_engine.storage.store import Store
from cluster_engine.testing import LiveServer, free_port
from cluster_engine.testing.pgbouncer import PgBouncer, PgBouncerUnavailable
from cluster_engine.testing.pgserver import PostgresServer, PostgresUnavailable, create_database
from cluster_engine.testing.samples import image_spec
from cluster_engine.testing.stores import in_store, opened_store

from .conftest import IN_CI

ACTOR = Actor(None, "test")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def run_callback(bouncer: PgBouncer, database: str, role: str, **extra: str) -> None:
    """deploy/ha/pgbouncer-callback.sh as Patroni runs it, against this PgBouncer."""
    env = {
        **os.environ,
        "PGBOUNCER_HOST": "127.0.0.1",
        "PGBOUNCER_PORT": str(bouncer.port),
        "PGBOUNCER_USER": next(iter(bouncer.users)),
        "CE_DATABASE": database,
        **extra,
    }
    script = DEPLOY / "ha" / "pgbouncer-callback.sh"
    result = subprocess.run(
        ["sh", str(script), "on_role_change", role, "cluster-engine"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def spec(name: str, org: uuid.UUID | None = None, idc: str = "us-west-1") -> ImageCreateReq:
    return image_spec(org or uuid.UUID(int=1), name, idc=idc)


async def create(
    url: str, name: str, org: uuid.UUID | None = None, image_type: ImageType = ImageType.PUBLIC
) -> None:
    async with opened_store(url) as store:
        await store.create_image(spec(name, org), image_type, ACTOR)


def image_body(name: str, org: uuid.UUID, image_type: str = "Public") -> dict[str, object]:
    return {**msgspec.to_builtins(spec(name, org)), "type": image_type}


def listed(client: httpx.Client, *, during_failover: bool = False) -> set[str]:
    """The names the list answers: a 200, or (``during_failover``: the worker's read model may not have
    confirmed the new primary yet, and a poll that failed a moment ago answers at once) the contract's
    503, which lists nothing."""
    response = client.get("/v1/images")
    if during_failover and response.status_code == 503:
        assert response.json() == {"reason": "database is unavailable"}, response.text
        return set()
    assert response.status_code == 200, response.text
    return {image["name"] for image in response.json()}


def start_pgbouncer(upstream_port: int, **settings: str) -> PgBouncer:
    """A PgBouncer of the test's own (pool settings of its own), or a skip without the binary (not in CI)."""
    return start_pgbouncer_with(upstream_port, None, None, settings)


def start_pgbouncer_with(
    upstream_port: int,
    databases: dict[str, str] | None,
    users: dict[str, str] | None,
    settings: dict[str, str],
) -> PgBouncer:
    try:
        return PgBouncer.start(upstream_port, databases=databases, users=users, settings=settings)
    except PgBouncerUnavailable:
        if IN_CI:
            raise
        pytest.skip("pgbouncer not found (apt-get install pgbouncer)")


def start_postgres() -> PostgresServer:
    """A throwaway PostgreSQL server of the test's own (it is demoted, or wants passwords), or a skip
    without the binaries (not in CI)."""
    try:
        return PostgresServer.start()
    except PostgresUnavailable:
        if IN_CI:
            raise
        pytest.skip("PostgreSQL server binaries not found")


@pytest.fixture
def direct_url(postgres_admin_url: str | None) -> str:
    """A fresh database on the suite's server, reached directly."""
    if postgres_admin_url is None:
        pytest.skip("PostgreSQL is not available on this machine")
    return create_database(postgres_admin_url)


def server_admin(url: str) -> str:
    """The server's ``postgres`` database, as the same user."""
    return make_url(url).set(database="postgres").render_as_string(hide_password=False)


def database_of(url: str) -> str:
    name = make_url(url).database
    assert name
    return name


# ------------------------------------------------------------------------------------------ the URL mark


def test_the_pgbouncer_parameter_is_the_services_own_and_never_reaches_libpq() -> None:
    plain = "postgresql://ce:pw@db:5432/ce?connect_timeout=2"
    assert not db.uses_pgbouncer(plain)
    assert db.uses_pgbouncer(plain + "&pgbouncer=true")
    assert db.uses_pgbouncer("postgresql://ce@db:6432/ce?pgbouncer=1")
    assert not db.uses_pgbouncer("postgresql://ce@db:6432/ce?pgbouncer=false")
    assert not db.uses_pgbouncer("sqlite:///x.db?pgbouncer=true")
    multi = "postgresql://ce@pg1:6432,pg2:6432/ce?target_session_attrs=read-write&pgbouncer=true"
    assert db.uses_pgbouncer(multi)
    for url in (plain + "&pgbouncer=true", multi):
        driver = make_url(db.async_url(url))
        assert "pgbouncer" not in driver.query and driver.drivername == "postgresql+psycopg"
    assert make_url(db.async_url(multi)).query["host"] == ("pg1:6432", "pg2:6432")
    with pytest.raises(ValueError, match="pgbouncer"):
        db.uses_pgbouncer("postgresql://ce@db/ce?pgbouncer=transaction")


def test_settings_refuse_listen_through_pgbouncer(tmp_path: Path) -> None:
    url = "postgresql://ce@db:6432/ce?pgbouncer=true"
    assert load_settings({"CE_DATABASE_URL": url, "CE_DATA_DIR": str(tmp_path)}).db_listen is False
    with pytest.raises(ConfigError, match="CE_DB_LISTEN"):
        load_settings({"CE_DATABASE_URL": url, "CE_DATA_DIR": str(tmp_path), "CE_DB_LISTEN": "true"})
    with pytest.raises(ConfigError, match="pgbouncer"):
        load_settings({"CE_DATABASE_URL": url.replace("true", "maybe"), "CE_DATA_DIR": str(tmp_path)})
    direct = "postgresql://ce@db:5432/ce"
    assert load_settings({"CE_DATABASE_URL": direct, "CE_DB_LISTEN": "true", "CE_DATA_DIR": str(tmp_path)})


# ------------------------------------------------------------------------------- sessions through the pooler


def test_without_the_parameter_pgbouncer_refuses_the_connection(
    pgbouncer: PgBouncer, direct_url: str
) -> None:
    """Why the mark exists: the statement timeout as a startup parameter (``options``) is refused."""
    unmarked = pgbouncer.url(direct_url).replace("?pgbouncer=true", "")

    async def connect() -> None:
        engine = db.create_engine(unmarked)
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        finally:
            await engine.dispose()

    with pytest.raises(sa.exc.OperationalError, match="unsupported startup parameter: options"):
        asyncio.run(connect())


def test_the_statement_timeout_holds_in_every_transaction(pgbouncer: PgBouncer, direct_url: str) -> None:
    """``SET LOCAL`` at the start of each transaction: SQLAlchemy's, and the org load's raw driver query;
    no timeout (the CLI's long operations) is 0 even where the database has a default of its own."""
    db.upgrade(pgbouncer.url(direct_url))
    url = pgbouncer.url(direct_url)

    async def run() -> None:
        store = Store(db.create_engine(url, statement_timeout=0.5, pool_size=1, max_overflow=0), url)
        locker = await psycopg.AsyncConnection.connect(direct_url)
        try:
            for _ in range(3):  # each transaction, on whichever server connection PgBouncer picks
                async with store.engine.connect() as conn:
                    assert await conn.scalar(sa.text("SHOW statement_timeout")) == "500ms"
            async with store.engine.connect() as conn:
                began = time.monotonic()
                with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                    await conn.execute(sa.text("SELECT pg_sleep(3)"))
                assert time.monotonic() - began < 2
            # the org load (one simple query on the driver's connection): blocked by a lock, cancelled at
            # the timeout, and raised as SQLAlchemy's error like any other statement's
            await locker.execute("LOCK TABLE images IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                await store.load_namespaces(["public"])
            assert time.monotonic() - began < 2
            await locker.rollback()
            assert (await store.load_namespaces(["public"])).images == []
        finally:
            await locker.close()
            await store.close()
        database = database_of(direct_url)
        with psycopg.connect(direct_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" SET statement_timeout = 1000')
        pgbouncer.admin(f"RECONNECT {database}")  # server sessions with the database's default
        with psycopg.connect(url.replace("?pgbouncer=true", "")) as plain:
            assert plain.execute("SHOW statement_timeout").fetchone() == ("1s",)
        unbounded = db.create_engine(url, statement_timeout=None)
        try:
            async with unbounded.connect() as conn:
                assert await conn.scalar(sa.text("SHOW statement_timeout")) == "0"
        finally:
            await unbounded.dispose()

    asyncio.run(run())


def test_polls_and_org_loads_through_pgbouncer_are_one_query_each_and_keep_the_statement_timeout(
    pgbouncer: PgBouncer, direct_url: str
) -> None:
    """A poll that finds nothing new (and the primary's revision a standby read needs), an org load, and
    the fetch of changes a poll found are each one simple query through PgBouncer: BEGIN READ WRITE, SET
    LOCAL statement_timeout, the SELECTs and COMMIT (storage/onetrip.py), so each holds a server
    connection only while the server runs it, not for several round trips and the gaps between them
    (PgBouncer's own counters: one query per transaction). The timeout still holds in them."""
    url = pgbouncer.url(direct_url)
    db.upgrade(url)
    database = database_of(direct_url)

    def counts() -> tuple[int, int]:
        row = next(r for r in pgbouncer.admin("SHOW STATS") if r["database"] == database)
        return int(row["total_xact_count"]), int(row["total_query_count"])

    async def run() -> None:
        store = Store(db.create_engine(url, statement_timeout=0.5, pool_size=1, max_overflow=0), url)
        locker = await psycopg.AsyncConnection.connect(direct_url)
        try:
            revision = await store.revision()
            xacts, queries = counts()
            for _ in range(20):
                assert (await store.changes_since(revision)).revision == revision
                assert await store.revision() == revision
            after = counts()
            assert (after[0] - xacts, after[1] - queries) == (40, 40)
            # an org load, and a poll that finds a change (its revision, then the changes): one each too
            xacts, queries = counts()
            for _ in range(5):
                assert (await store.load_namespaces(["public", str(uuid.uuid4())])).revision == revision
            gone = uuid.uuid4()
            async with await psycopg.AsyncConnection.connect(direct_url) as other:  # another replica's write
                await other.execute("UPDATE catalog_state SET revision = revision + 1 WHERE id = 1")
                await other.execute(
                    "INSERT INTO deleted_images (id, revision) VALUES (%s, %s)", (gone, revision + 1)
                )
            changes = await store.changes_since(revision)
            assert (changes.revision, changes.upserted, changes.deleted) == (
                revision + 1,
                [],
                [(str(gone), revision + 1)],
            )
            after = counts()
            assert (after[0] - xacts, after[1] - queries) == (7, 7)
            revision += 1
            await locker.execute("LOCK TABLE catalog_state IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                await store.changes_since(revision)
            assert time.monotonic() - began < 2
            await locker.rollback()
            assert (await store.changes_since(revision)).revision == revision  # a new connection
        finally:
            await locker.close()
            await store.close()

    asyncio.run(run())


def test_transactions_stay_whole_with_the_driver_in_autocommit(pgbouncer: PgBouncer, direct_url: str) -> None:
    """psycopg runs in autocommit mode through PgBouncer (our BEGIN opens each transaction): SQLAlchemy's
    transactions are still one server transaction each, rolled back on error and on close."""
    url = pgbouncer.url(direct_url)
    db.upgrade(url)
    row = sa.text("INSERT INTO deleted_images (id, revision) VALUES (:id, 1)")
    count = sa.text("SELECT count(*) FROM deleted_images")

    async def run() -> None:
        engine = db.create_engine(url)
        try:
            async with engine.connect() as conn:
                first = await conn.scalar(sa.text("SELECT txid_current()"))
                await conn.execute(row, {"id": uuid.uuid4()})
                assert await conn.scalar(sa.text("SELECT txid_current()")) == first
            # closed without commit: rolled back
            with contextlib.suppress(RuntimeError):
                async with engine.begin() as conn:
                    await conn.execute(row, {"id": uuid.uuid4()})
                    raise RuntimeError("abandon it")
            failing = uuid.uuid4()
            with pytest.raises(sa.exc.IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(row, {"id": failing})
                    await conn.execute(row, {"id": failing})
            async with engine.connect() as conn:
                assert await conn.scalar(count) == 0
            async with engine.begin() as conn:
                await conn.execute(row, {"id": uuid.uuid4()})
            async with engine.connect() as conn:
                assert await conn.scalar(count) == 1
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_clients_sharing_one_server_connection_never_collide_on_prepared_statements(direct_url: str) -> None:
    """Two stores, one server connection (default_pool_size 1): without prepared statements their
    statements interleave freely. The control: psycopg's own prepared statements collide at once."""
    with start_pgbouncer(make_url(direct_url).port or 5432, default_pool_size="1") as bouncer:
        url = bouncer.url(direct_url)
        db.upgrade(url)
        plain = url.replace("?pgbouncer=true", "")
        first, second = (
            psycopg.connect(plain, prepare_threshold=0),
            psycopg.connect(plain, prepare_threshold=0),
        )
        with first, second:
            first.execute("SELECT %s::int", (1,))
            first.commit()
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                second.execute("SELECT %s::int", (2,))

        async def run() -> None:
            stores = [Store.open(url), Store.open(url)]
            org = uuid.uuid4()

            async def work(store: Store, index: int) -> None:
                for n in range(15):
                    await store.changes_since(0)
                    await store.load_namespaces(["public", str(org)])
                    await store.revision()
                    if n % 5 == 0:
                        await store.create_image(spec(f"s{index}-{n}"), ImageType.PUBLIC, ACTOR)

            try:
                await asyncio.gather(*(work(store, i) for i, store in enumerate(stores)))
                assert len((await stores[0].load_namespaces(["public"])).images) == 6
            finally:
                for store in stores:
                    await store.close()

        asyncio.run(run())


def test_a_multi_host_url_through_pgbouncer_passes_a_dead_host(pgbouncer: PgBouncer, direct_url: str) -> None:
    """The service's own host choice (``target_session_attrs=read-write`` through a pooler) skips a host
    that does not answer, as libpq does; with no host left it is an OperationalError (a 503)."""
    db.upgrade(pgbouncer.url(direct_url))
    dead = free_port()
    database = database_of(direct_url)
    live = f"127.0.0.1:{pgbouncer.port}"

    def revision(hosts: str) -> int:
        url = f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write&pgbouncer=true"
        return in_store(url, lambda store: store.revision())

    assert revision(f"127.0.0.1:{dead},{live}") == 0
    with pytest.raises(sa.exc.OperationalError, match="no host takes writes"):
        revision(f"127.0.0.1:{dead},127.0.0.1:{free_port()}")


def test_a_standby_behind_pgbouncer_fails_the_transaction_and_refills_the_pool() -> None:
    """A node demoted behind a PgBouncer leaves the service's connections to the PgBouncer open, and
    PgBouncer connects them to the standby: the first transaction fails (BEGIN READ WRITE, reads too)
    as an OperationalError (a 503) and drops the pool's connections, so the next ones are new."""
    with start_postgres() as postgres, start_pgbouncer(postgres.port) as bouncer:
        url = bouncer.url(postgres.create_database())
        db.upgrade(url)

        async def run() -> None:
            store = Store(db.create_engine(url, pool_size=1, max_overflow=0), url)
            try:
                await store.create_image(spec("before"), ImageType.PUBLIC, ACTOR)
                async with store.engine.connect() as conn:
                    before = (await conn.get_raw_connection()).driver_connection
                postgres.demote()
                errors: list[sa.exc.OperationalError] = []
                while len(errors) < 10:  # the first ones may meet the server's restart instead
                    with pytest.raises(sa.exc.OperationalError) as raised:
                        await store.revision()
                    errors.append(raised.value)
                    if "read-write mode during recovery" in str(raised.value):
                        break
                    await asyncio.sleep(0.2)
                assert "read-write mode during recovery" in str(errors[-1]), errors
                assert errors[-1].connection_invalidated
                postgres.promote()
                await store.create_image(spec("after"), ImageType.PUBLIC, ACTOR)
                async with store.engine.connect() as conn:
                    assert (await conn.get_raw_connection()).driver_connection is not before
            finally:
                await store.close()

        asyncio.run(run())


def test_migrations_and_the_warm_start_cursor_work_through_pgbouncer(
    pgbouncer: PgBouncer, direct_url: str, tmp_path: Path
) -> None:
    """``cluster-engine db upgrade`` through PgBouncer, then a warm start's server-side cursor
    (``Store.customized``) streams every org whole, in batches."""
    url = pgbouncer.url(direct_url)
    env = {**os.environ, "CE_DATABASE_URL": url, "CE_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "cluster_engine", "db", "upgrade"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout
    orgs = sorted(str(uuid.uuid4()) for _ in range(7))

    async def run() -> list[tuple[int, list[str]]]:
        async with opened_store(url) as store:
            assert await store.schema_revision() == db.head_revision()
            for index, org in enumerate(orgs):
                for n in range(index % 3 + 1):
                    await store.create_image(spec(f"own-{n}", uuid.UUID(org)), ImageType.CUSTOMIZED, ACTOR)
            return [
                (revision, [namespace for namespace, _ in batch])
                async for revision, batch in store.customized(2)
            ]

    batches = asyncio.run(run())
    streamed = [namespace for _, namespaces in batches for namespace in namespaces]
    assert sorted(set(streamed)) == orgs and len(streamed) == sum(i % 3 + 1 for i in range(len(orgs)))
    assert len(batches) > 1 and len({revision for revision, _ in batches}) == 1
    for (_, one), (_, two) in itertools.pairwise(batches):
        assert one[-1] != two[0], "an org was split between batches"


# ------------------------------------------------------------------------------------------ the service


@contextlib.contextmanager
def sampling(sample: Callable[[], int], interval: float = 0.005) -> Iterator[list[int]]:
    """Calls ``sample`` in a thread until the block ends; its values so far."""
    values: list[int] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            values.append(sample())
            time.sleep(interval)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield values
    finally:
        stop.set()
        thread.join()


def test_workers_through_pgbouncer_share_a_few_server_connections(direct_url: str, tmp_path: Path) -> None:
    """Two workers (CE_DB_POOL_SIZE 1 + CE_DB_POOL_OVERFLOW 1 each) through a PgBouncer with 2 server
    connections for the database: cold org loads and writes all succeed, each worker holds at most its
    budget of client connections at PgBouncer, and the server never sees more than the pool's 2."""
    with start_pgbouncer(make_url(direct_url).port or 5432, default_pool_size="2") as bouncer:
        url = bouncer.url(direct_url)
        database = database_of(direct_url)
        db.upgrade(url)

        for n in range(2):  # more Customized images than a worker holds: every new org is a cold load
            asyncio.run(create(url, f"seed-{n}", uuid.uuid4(), ImageType.CUSTOMIZED))
        env = {"CE_DB_POOL_SIZE": "1", "CE_DB_POOL_OVERFLOW": "1", "CE_CACHE_IMAGES": "1"}
        with (
            contextlib.ExitStack() as stack,
            LiveServer.start(tmp_path, database_url=url, args=["--workers", "2"], env=env) as server,
        ):
            admin = httpx.Client(
                base_url=server.url,
                headers={"Authorization": f"Bearer {server.token(uuid.uuid4(), scopes=['images:admin'])}"},
            )

            # one connection each for the samplers (a new one every 5 ms would load the machine)
            console = stack.enter_context(
                psycopg.connect(bouncer.admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor)
            )
            stats = stack.enter_context(psycopg.connect(server_admin(direct_url), autocommit=True))

            def clients() -> int:
                cursor = console.execute("SHOW CLIENTS")
                column = [c.name for c in cursor.description or ()].index("database")
                return sum(1 for row in cursor.fetchall() if row[column] == database)

            def servers() -> int:
                # client backends only: an autovacuum worker on the database (the writes here can start
                # one) has its datname too, and would count as one of PgBouncer's server connections
                query = (
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = %s AND backend_type = 'client backend'"
                )
                return int(stats.execute(query, (database,)).fetchone()[0])  # type: ignore[index]

            def burst(_: int) -> int:
                with server.client(uuid.uuid4()) as client:
                    return client.get("/v1/images").status_code

            with (
                sampling(clients) as client_counts,
                sampling(servers) as server_counts,
                concurrent.futures.ThreadPoolExecutor(16) as pool,
            ):
                statuses = list(pool.map(burst, range(200)))
                writes = [
                    pool.submit(admin.post, "/v1/images", json=image_body(f"w-{n}", uuid.uuid4()))
                    for n in range(20)
                ]
                created = [write.result().status_code for write in writes]
            admin.close()
    assert set(statuses) == {200} and set(created) == {201}
    print(f"through PgBouncer: peak {max(client_counts)} clients, {max(server_counts)} server connections")
    assert 0 < max(client_counts) <= 4, max(client_counts)
    assert max(server_counts) <= 2, max(server_counts)


@pytest.mark.parametrize("callback", [True, False], ids=["with-callback", "without-callback"])
def test_a_failover_behind_per_node_pgbouncers_reaches_the_new_primary(
    tmp_path: Path, callback: bool
) -> None:
    """deploy/ha/'s topology with a PgBouncer per node: the service's URL names both PgBouncers with
    target_session_attrs=read-write. The primary is demoted and the standby promoted (as Patroni does).
    PgBouncer announces the server parameters its pool saw first (in_hot_standby among them), so libpq
    alone would go on taking the demoted node for the primary and the promoted one for a standby: the
    service asks each host itself, and its BEGIN READ WRITE fails on the demoted node. Writes go to the
    new primary within seconds, without restarting the service, with or without the Patroni callback
    (deploy/ha/pgbouncer-callback.sh: KILL + RESUME on each node's PgBouncer after its role changed,
    which also moves idle connections at once)."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(start_postgres())
        direct = first.create_database()
        database = database_of(direct)
        db.upgrade(direct)
        second = stack.enter_context(PostgresServer.start_standby(first))
        bouncers = [stack.enter_context(start_pgbouncer(node.port)) for node in (first, second)]
        hosts = ",".join(f"127.0.0.1:{bouncer.port}" for bouncer in bouncers)
        url = f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write&pgbouncer=true"
        server = stack.enter_context(LiveServer.start(tmp_path, database_url=url))
        org = uuid.uuid4()
        writer = stack.enter_context(
            httpx.Client(
                base_url=server.url,
                headers={"Authorization": f"Bearer {server.token(org, scopes=['images:admin'])}"},
                timeout=10,
            )
        )
        assert writer.post("/v1/images", json=image_body("before", org)).status_code == 201
        # a session through the standby's PgBouncer (as libpq's own attempts make while the first node is
        # down): its pool now holds the standby's startup parameters, in_hot_standby = on
        with psycopg.connect(
            make_url(bouncers[1].url(direct)).difference_update_query(["pgbouncer"]).render_as_string()
        ) as conn:
            assert conn.info.parameter_status("in_hot_standby") == "on"

        first.demote()
        second.promote()
        for bouncer, role in zip(bouncers, ("replica", "primary"), strict=True) if callback else ():
            run_callback(bouncer, database, role)  # on each node after its role changed
        failed_over = time.monotonic()
        statuses = []
        while True:
            response = writer.post("/v1/images", json=image_body(f"after-{len(statuses)}", org))
            statuses.append(response.status_code)
            if response.status_code == 201:
                break
            assert response.status_code == 503, response.text
            assert time.monotonic() - failed_over < 15, statuses
            time.sleep(0.2)
        print(f"writes back {time.monotonic() - failed_over:.2f} s after the failover: {statuses}")
        # the worker's reads moved too: a write made elsewhere on the new primary is listed within a second
        asyncio.run(create(make_url(second.url).set(database=database).render_as_string(), "elsewhere", org))
        deadline = time.monotonic() + 2
        while "elsewhere" not in listed(writer, during_failover=True):
            assert time.monotonic() < deadline, "the worker does not follow the new primary"
            time.sleep(0.05)
        for n in range(5):
            assert writer.post("/v1/images", json=image_body(f"later-{n}", org)).status_code == 201
        names = listed(writer)
        assert {"before", "later-4"} <= names
        with psycopg.connect(make_url(second.url).set(database=database).render_as_string()) as conn:
            assert {name for (name,) in conn.execute("SELECT name FROM images")} == names


# ---------------------------------------------------------------------------------------------- deploy/


def _ini(path: Path, **values: str) -> configparser.ConfigParser:
    text = path.read_text()
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


@pytest.mark.parametrize("name", ["pgbouncer/pgbouncer.ini", "ha/pgbouncer.ini"])
def test_the_deploy_pgbouncer_configurations_work_with_debians_pgbouncer(name: str, tmp_path: Path) -> None:
    """deploy/'s PgBouncer settings (compose's, and the HA nodes') with Debian's pgbouncer in front of a
    throwaway server that wants SCRAM from the service's role: migrations and the service's queries pass,
    a wrong password does not, the container's health check answers. HA: userlist.txt holds the SCRAM
    secrets PostgreSQL stores (no plain password), and the Patroni callback logs in with its pgpass."""
    with start_postgres() as postgres:
        config = _ini(DEPLOY / name, NODE_ADDRESS="127.0.0.1", PG_PORT=str(postgres.port))
        settings = dict(config["pgbouncer"])
        assert settings["pool_mode"] == "transaction" and settings["auth_type"] == "scram-sha-256"
        for own in ("listen_addr", "listen_port", "unix_socket_dir", "auth_file", "logfile", "pidfile"):
            settings.pop(own, None)  # the helper's: a free loopback port, its own files
        if name.startswith("ha/"):
            passwords = {"cluster_engine": "node-secret", "pgbouncer_admin": "admin-secret"}
        else:
            lines = (DEPLOY / "pgbouncer" / "userlist.txt").read_text().splitlines()
            passwords = {
                user.strip('"'): secret.strip('"') for user, secret in (n.split('" "') for n in lines)
            }
        ((database, connect),) = config["databases"].items()
        connect = re.sub(r"host=\S+", "host=127.0.0.1", re.sub(r"port=\S+", f"port={postgres.port}", connect))
        hba = postgres.data_dir / "data" / "pg_hba.conf"
        hba.write_text(f"host all cluster_engine 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            for user, password in passwords.items():  # the admin user too, only to have its SCRAM secret
                admin.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
            admin.execute(f"CREATE DATABASE {database} OWNER cluster_engine")
            admin.execute("SELECT pg_reload_conf()")
            secrets = dict(
                admin.execute(
                    "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)", (list(passwords),)
                ).fetchall()
            )
        with pytest.raises(psycopg.OperationalError, match="password"):  # the server wants SCRAM now
            psycopg.connect(f"postgresql://cluster_engine@127.0.0.1:{postgres.port}/{database}").close()
        users = secrets if name.startswith("ha/") else passwords
        assert all(secret.startswith("SCRAM-SHA-256$") for secret in secrets.values())
        with start_pgbouncer_with(postgres.port, {database: connect}, users, settings) as bouncer:
            url = f"postgresql://cluster_engine:{passwords['cluster_engine']}@127.0.0.1:{bouncer.port}/{database}"
            db.upgrade(url + "?pgbouncer=true")
            asyncio.run(create(url + "?pgbouncer=true", "through-deploy-config"))
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(url.replace(passwords["cluster_engine"], "wrong"), connect_timeout=5).close()
            ready = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(bouncer.port)], timeout=30)
            assert ready.returncode == 0
            if "pgbouncer_admin" in passwords:
                pgpass = tmp_path / "pgpass"
                pgpass.write_text(f"127.0.0.1:{bouncer.port}:pgbouncer:pgbouncer_admin:admin-secret\n")
                pgpass.chmod(0o600)
                extra = {"PGBOUNCER_USER": "pgbouncer_admin", "PGBOUNCER_PGPASSFILE": str(pgpass)}
                run_callback(bouncer, database, "replica", **extra)


def test_the_pgbouncer_image_passes_hadolint_and_compose_goes_through_it() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(DEPLOY / "pgbouncer" / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in ("migrate", "api"):
        url = compose["services"][service]["environment"]["CE_DATABASE_URL"]
        assert "@pgbouncer:6432/" in url and db.uses_pgbouncer(url)
        assert compose["services"][service]["environment"].get("CE_DB_LISTEN", "false") == "false"
    env = (DEPLOY / "ha" / "cluster-engine.env").read_text()
    assert any(db.uses_pgbouncer(line.lstrip("# ").partition("=")[2]) for line in env.splitlines())
