"""A user's conftest: fixtures of their own, built on the plugin's. It imports nothing from ``tests/``.

This directory is run on its own (``tests/test_plugin.py`` starts ``python -m pytest`` here, where
``pytest.ini`` makes it the rootdir). The main suite (``testpaths = ["tests"]``) would otherwise collect
it a second time, against the main conftest: ``pytest_ignore_collect`` below skips this directory's
files whenever this directory is not the rootdir. Naming a file here explicitly still runs it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_engine.client import Client
from cluster_engine.pytest_plugin import TokenFactory
from cluster_engine.testing import LiveServer

HERE = Path(__file__).parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    return True if config.rootpath != HERE else None


@pytest.fixture
def fresh_org() -> uuid.UUID:
    return uuid.uuid4()


@pytest.fixture
def reader(
    cluster_engine_server: LiveServer, cluster_engine_token: TokenFactory, fresh_org: uuid.UUID
) -> Iterator[Client]:
    """A read-only client of an org of its own."""
    with Client(cluster_engine_server.url, cluster_engine_token(fresh_org)) as client:
        yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
