from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from cluster_engine.cli.main import DEMO_ORG, demo_catalog
from cluster_engine.storage import db
from cluster_engine.testing import LiveServer
from cluster_engine.testing.pgbouncer import PgBouncer, PgBouncerUnavailable
from cluster_engine.testing.pgserver import PostgresServer, PostgresUnavailable, create_database

from .toolkit import App, in_process

OTHER_ORG = uuid.UUID("5d6c8a0e-9b1f-4e2a-8c3d-7f6e5d4c3b2a")
STORES = ["sqlite", "postgresql"]
# CE_TEST_VIA_PGBOUNCER=1: every PostgreSQL database the suite hands out (``databases``) is reached through
# a throwaway PgBouncer in transaction-pooling mode (``pgbouncer=true`` URLs). `.ci/run` runs the tests
# marked ``postgresql`` (below) this way after the main run.
VIA_PGBOUNCER = os.environ.get("CE_TEST_VIA_PGBOUNCER", "").lower() in ("1", "true", "yes", "on")
IN_CI = os.environ.get("CI") == "true"


def chromium() -> str:
    """Debian's chromium for the browser tests (Playwright never downloads a browser here): a failure
    under CI (.ci/run installs it), a skip elsewhere."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if IN_CI:
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    return executable


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "postgresql: gets a PostgreSQL database from the `databases` fixture (applied by conftest.py; "
        "the PgBouncer pass runs these)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "databases" in getattr(item, "fixturenames", ()) and "sqlite" not in params.values():
            item.add_marker(pytest.mark.postgresql)


class Databases:
    """Hands out empty databases: SQLite files, or fresh databases on the test PostgreSQL server (through
    ``pgbouncer`` when set: created directly, handed out as URLs through it)."""

    def __init__(
        self,
        postgres_admin_url: str | None,
        pgbouncer: PgBouncer | None = None,
        unavailable: str = "PostgreSQL is not available on this machine",
    ) -> None:
        self.postgres_admin_url = postgres_admin_url
        self.pgbouncer = pgbouncer
        self.unavailable = unavailable

    def url(self, store: str, directory: Path) -> str:
        if store == "sqlite":
            return f"sqlite:///{directory / 'cluster-engine.db'}"
        if self.postgres_admin_url is None:
            pytest.skip(self.unavailable)
        url = create_database(self.postgres_admin_url)
        return url if self.pgbouncer is None else self.pgbouncer.url(url)

    def migrated(self, store: str, directory: Path) -> str:
        """``url`` of an empty database already at the migration head."""
        url = self.url(store, directory)
        db.upgrade(url)
        return url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    """A throwaway PostgreSQL server for the session (None when CE_TEST_DATABASE_URL points elsewhere)."""
    if os.environ.get("CE_TEST_DATABASE_URL"):
        yield None
        return
    try:
        server = PostgresServer.start()
    except PostgresUnavailable:
        if IN_CI:
            raise  # CI must run the PostgreSQL tests, never skip them
        pytest.skip("PostgreSQL server binaries not found")
    with server:
        yield server


@pytest.fixture(scope="session")
def postgres_admin_url(request: pytest.FixtureRequest) -> str | None:
    """A direct URL of the test PostgreSQL server's admin database (None: no PostgreSQL here)."""
    external = os.environ.get("CE_TEST_DATABASE_URL")
    if external:
        return external
    try:
        server = request.getfixturevalue("postgres_server")
    except pytest.skip.Exception:
        return None
    return str(server.url)


@pytest.fixture(scope="session")
def pgbouncer(postgres_admin_url: str | None) -> Iterator[PgBouncer]:
    """A throwaway PgBouncer (transaction pooling) in front of the test PostgreSQL server."""
    if postgres_admin_url is None:
        pytest.skip("PostgreSQL is not available on this machine")
    url = make_url(postgres_admin_url)
    try:
        bouncer = PgBouncer.start(
            url.port or 5432,
            upstream_host=url.host or "127.0.0.1",
            users={url.username or "postgres": url.password or ""},
        )
    except PgBouncerUnavailable:
        if IN_CI:
            raise  # CI runs the PgBouncer tests, never skips them (.ci/run installs pgbouncer)
        pytest.skip("pgbouncer not found (apt-get install pgbouncer)")
    with bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def databases(request: pytest.FixtureRequest, postgres_admin_url: str | None) -> Databases:
    if postgres_admin_url is None or not VIA_PGBOUNCER:
        return Databases(postgres_admin_url)
    try:
        bouncer = request.getfixturevalue("pgbouncer")
    except pytest.skip.Exception:
        return Databases(None, unavailable="CE_TEST_VIA_PGBOUNCER=1 but pgbouncer was not found")
    return Databases(postgres_admin_url, bouncer)


def start_server(databases: Databases, store: str, directory: Path, *args: str) -> LiveServer:
    url = databases.url(store, directory)
    extra = ["--migrate"] if store == "postgresql" else []
    return LiveServer.start(directory, database_url=url, args=[*extra, *args])


def serve(
    request: pytest.FixtureRequest, databases: Databases, directory: Path, *args: str
) -> Iterator[LiveServer]:
    """The body of a server fixture parametrized by ``STORES``: a server on ``request.param``'s store."""
    with start_server(databases, request.param, directory, *args) as server:
        yield server


@pytest.fixture(scope="session")
def demo_entries() -> list[dict[str, Any]]:
    entries = demo_catalog()
    assert isinstance(entries, list)
    return entries


@pytest.fixture(scope="session", params=STORES)
def demo_server(
    request: pytest.FixtureRequest, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A real server process with the demo catalog, on each store. Read-only: tests must not change it."""
    yield from serve(request, databases, tmp_path_factory.mktemp("demo"), "--demo")


@pytest.fixture(scope="session", params=STORES)
def shared_server(
    request: pytest.FixtureRequest, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server that starts with an empty catalog, on each store, shared by the tests that write: each
    writes as orgs of its own (``uuid.uuid4()``), or empties the catalog first (``toolkit.fresh_catalog``)
    when it asserts on what every org sees (Public images, exports, the audit trail)."""
    yield from serve(request, databases, tmp_path_factory.mktemp("shared"))


@pytest.fixture(params=STORES)
def server(request: pytest.FixtureRequest, databases: Databases, tmp_path: Path) -> Iterator[LiveServer]:
    """A fresh server with an empty catalog, on each store, for tests whose server is theirs alone."""
    yield from serve(request, databases, tmp_path / "server")


@pytest.fixture(scope="session")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The demo catalog served by the app in this process (SQLite; no Granian): for rules of the
    application (bodies, statuses, documents) that need no server process. Read-only, like ``demo_server``."""
    with in_process(tmp_path_factory.mktemp("app"), demo=True) as served:
        yield served


@pytest.fixture
def demo_org() -> uuid.UUID:
    return DEMO_ORG


@pytest.fixture
def other_org() -> uuid.UUID:
    return OTHER_ORG
