from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster_engine.cli import DEMO_ORG, demo_catalog
from cluster_engine.pgserver import PostgresServer, PostgresUnavailable, create_database
from cluster_engine.testing import LiveServer

OTHER_ORG = uuid.UUID("5d6c8a0e-9b1f-4e2a-8c3d-7f6e5d4c3b2a")
STORES = ["sqlite", "postgresql"]


class Databases:
    """Hands out empty databases: SQLite files, or fresh databases on the test PostgreSQL server."""

    def __init__(self, postgres_admin_url: str | None) -> None:
        self.postgres_admin_url = postgres_admin_url

    def url(self, store: str, directory: Path) -> str:
        if store == "sqlite":
            return f"sqlite:///{directory / 'cluster-engine.db'}"
        if self.postgres_admin_url is None:
            pytest.skip("PostgreSQL is not available on this machine")
        return create_database(self.postgres_admin_url)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    """A throwaway PostgreSQL server for the session (None when CE_TEST_DATABASE_URL points elsewhere)."""
    if os.environ.get("CE_TEST_DATABASE_URL"):
        yield None
        return
    try:
        server = PostgresServer.start()
    except PostgresUnavailable:
        if os.environ.get("CI") == "true":
            raise  # CI must run the PostgreSQL tests, never skip them
        pytest.skip("PostgreSQL server binaries not found")
    with server:
        yield server


@pytest.fixture(scope="session")
def databases(request: pytest.FixtureRequest) -> Databases:
    external = os.environ.get("CE_TEST_DATABASE_URL")
    if external:
        return Databases(external)
    try:
        server = request.getfixturevalue("postgres_server")
    except pytest.skip.Exception:
        return Databases(None)
    return Databases(server.url)


def start_server(databases: Databases, store: str, directory: Path, *args: str) -> LiveServer:
    url = databases.url(store, directory)
    extra = ["--migrate"] if store == "postgresql" else []
    return LiveServer.start(directory, database_url=url, args=[*extra, *args])


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
    with start_server(databases, request.param, tmp_path_factory.mktemp("demo"), "--demo") as server:
        yield server


@pytest.fixture(params=STORES)
def server(request: pytest.FixtureRequest, databases: Databases, tmp_path: Path) -> Iterator[LiveServer]:
    """A fresh server with an empty catalog, on each store, for tests that write."""
    with start_server(databases, request.param, tmp_path / "server") as server:
        yield server


@pytest.fixture
def demo_org() -> uuid.UUID:
    return DEMO_ORG


@pytest.fixture
def other_org() -> uuid.UUID:
    return OTHER_ORG
