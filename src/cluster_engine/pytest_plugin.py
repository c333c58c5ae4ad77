"""A pytest plugin for code that talks to the Images API: a real server, tokens, a client, catalogs.

Installed with the package (entry point ``pytest11``), so its fixtures are simply there::

    def test_my_code(cluster_engine_client, cluster_engine_catalog):
        cluster_engine_catalog.load("tests/catalog.yaml")
        assert my_code.pick_image(cluster_engine_client, idc="us-west-1").name == "Ubuntu-24.04"

``cluster_engine_server``   session: a real server process (``cluster_engine.testing.LiveServer``) on a free
                           loopback port with a temporary SQLite database; ``.url``, ``.token(…)``.
``cluster_engine_token``    ``(org=None, scopes=()) -> str``: a valid bearer token (org defaults to
                           ``DEFAULT_ORG``).
``cluster_engine_client``   a ``cluster_engine.client.Client`` for ``DEFAULT_ORG`` with ``images:write``.
``cluster_engine_catalog``  ``.load(entries_or_path, replace=False)``: import a catalog (a list of entries,
                           or a YAML/JSON file) the way operators do, wait until it is served, and return
                           the loaded images; ``.clear()`` removes every image.

The server is started only by a test that asks for one of these fixtures, once per session, and it is
shared: Public images loaded by one test are seen by the next (use ``replace=True`` or ``clear()``), while
Customized images are private to their org (pass a fresh org to ``cluster_engine_token``). Importing this
module costs nothing beyond pytest: everything else is imported when a fixture is first used.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest

if TYPE_CHECKING:
    from .client import Client, ImageResp
    from .store import Store
    from .testing import LiveServer

T = TypeVar("T")

DEFAULT_ORG = uuid.UUID("3f0c6c1e-8a53-4b0e-9d41-6a2f0e7b5c19")
"""The org of ``cluster_engine_client`` and of ``cluster_engine_token()`` without ``org``."""


class TokenFactory(Protocol):
    """The type of ``cluster_engine_token``: ``(org=None, scopes=()) -> str``."""

    def __call__(self, org: uuid.UUID | str | None = None, scopes: Sequence[str] = ()) -> str: ...


class Catalog:
    """Loads catalog files into the session's server the way ``cluster-engine catalog import`` does (the
    same validation and the same one-transaction import into the server's database), then waits until
    the server serves the new revision."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server

    def load(
        self, source: Sequence[dict[str, Any]] | str | Path, *, replace: bool = False
    ) -> list[ImageResp]:
        """Create or update the entries of ``source`` (entries, or a YAML/JSON catalog file); with
        ``replace``, also delete the Public images it does not list. Returns the images as now served,
        in the order of the entries. A catalog the import rejects raises ValueError, saying why."""
        import yaml

        from .errors import ApiError, RequestInvalid
        from .store import Actor
        from .validation import read_catalog_entries

        if isinstance(source, str | Path):
            entries = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        else:
            entries = list(source)
        actor = Actor(org_id=None, name="pytest:cluster_engine_catalog")
        try:
            parsed = read_catalog_entries(entries)
            report = self._in_store(lambda store: store.import_catalog(parsed, prune=replace, actor=actor))
        except RequestInvalid as exc:
            lines = [f"{d.field}: {d.reason} (got {d.originalValue!r})" for d in exc.details]
            raise ValueError("\n".join([f"catalog rejected: {exc}", *lines])) from None
        except ApiError as exc:
            raise ValueError(f"catalog rejected: {exc}") from None
        if report.revision is not None:
            self.server.wait_synced()
        return self._served(entries)

    def clear(self) -> None:
        """Delete every image: Public ones and every org's Customized ones."""
        from .client import Client

        images = self._in_store(lambda store: store.export_catalog())
        with Client(self.server.url, self._token(DEFAULT_ORG, "images:admin"), retries=0) as admin:
            for image in images:
                admin.delete_image(image.id)
        self.server.wait_synced()

    def _in_store(self, work: Callable[[Store], Awaitable[T]]) -> T:
        """Run ``work`` on the server's database, in a thread of its own (the caller may be inside an
        event loop, as async tests are)."""
        import asyncio
        import concurrent.futures

        from .store import Store

        async def run() -> T:
            store = Store.open(self.server.env["CE_DATABASE_URL"], statement_timeout=None)
            try:
                return await work(store)
            finally:
                await store.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()

    def _token(self, org: uuid.UUID | str, *scopes: str) -> str:
        return self.server.token(org, scopes=scopes)

    def _served(self, entries: Sequence[dict[str, Any]]) -> list[ImageResp]:
        """The served image of each entry: by ``id`` when it has one, else by (type, owner, idc, name)."""
        from .client import Client

        found: dict[object, ImageResp] = {}
        for owner in {_owner(entry) for entry in entries}:  # a caller sees Public + its own org's images
            with Client(self.server.url, self._token(owner or DEFAULT_ORG), retries=0) as client:
                for image in client.list_images():
                    kind = image.type.value
                    found[str(image.id)] = image
                    found[(kind, str(image.orgId) if kind != "Public" else "", image.idc, image.name)] = image
        return [
            found[str(e["id"]) if "id" in e else (e.get("type", "Public"), _owner(e), e["idc"], e["name"])]
            for e in entries
        ]


def _owner(entry: dict[str, Any]) -> str:
    """Whose namespace a catalog entry lands in: "" for Public (the default in files), else its org."""
    return "" if entry.get("type", "Public") == "Public" else str(entry["orgId"])


@pytest.fixture(scope="session")
def cluster_engine_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real cluster-engine server for the session, on a free loopback port, with a temporary SQLite db."""
    from .testing import LiveServer

    with LiveServer.start(tmp_path_factory.mktemp("cluster-engine")) as server:
        yield server


@pytest.fixture(scope="session")
def cluster_engine_token(cluster_engine_server: LiveServer) -> TokenFactory:
    """``cluster_engine_token(org=None, scopes=())``: a bearer token the session's server accepts."""

    def token(org: uuid.UUID | str | None = None, scopes: Sequence[str] = ()) -> str:
        return cluster_engine_server.token(org if org is not None else DEFAULT_ORG, scopes=list(scopes))

    return token


@pytest.fixture
def cluster_engine_client(
    cluster_engine_server: LiveServer, cluster_engine_token: TokenFactory
) -> Iterator[Client]:
    """A ``Client`` of the session's server for ``DEFAULT_ORG`` with the ``images:write`` scope."""
    from .client import Client

    with Client(cluster_engine_server.url, cluster_engine_token(scopes=["images:write"])) as client:
        yield client


@pytest.fixture
def cluster_engine_catalog(cluster_engine_server: LiveServer) -> Catalog:
    """Load catalog fixtures into the session's server: ``cluster_engine_catalog.load(entries_or_path)``."""
    return Catalog(cluster_engine_server)


__all__ = ["DEFAULT_ORG", "Catalog", "TokenFactory"]
