from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster_engine.cli import DEMO_ORG, demo_catalog
from cluster_engine.testing import LiveServer

OTHER_ORG = uuid.UUID("5d6c8a0e-9b1f-4e2a-8c3d-7f6e5d4c3b2a")


@pytest.fixture(scope="session")
def demo_entries() -> list[dict[str, Any]]:
    entries = demo_catalog()
    assert isinstance(entries, list)
    return entries


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real server process on SQLite with the demo catalog. Read-only: tests must not change its catalog."""
    with LiveServer.start(tmp_path_factory.mktemp("demo"), args=["--demo"]) as server:
        yield server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    """A fresh server with an empty catalog, for tests that write."""
    with LiveServer.start(tmp_path / "server") as server:
        yield server


@pytest.fixture
def demo_org() -> uuid.UUID:
    return DEMO_ORG


@pytest.fixture
def other_org() -> uuid.UUID:
    return OTHER_ORG
