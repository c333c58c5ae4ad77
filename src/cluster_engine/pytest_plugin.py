"""A pytest plugin for code that talks to the Images API: a real server, tokens, clients, catalogs.

Installed with the package (entry point ``pytest11``), so its fixtures are simply there::

    def test_my_code(cluster_engine_client, cluster_engine_catalog):
        cluster_engine_catalog.load("tests/catalog.yaml")
        assert my_code.pick_image(cluster_engine_client, idc="us-west-1").name == "Ubuntu-24.04"

``cluster_engine_server``   session: a real server process (``cluster_engine.testing.LiveServer``) on a free
                           loopback port with a temporary SQLite database and none of the caller's ``CE_*``
                           settings; or, with ``--cluster-engine-url``, a server already running
                           (``cluster_engine.testing.ExistingServer``). ``.url``, ``.token(…)``.
``cluster_engine_token``    ``(org=None, scopes=()) -> str``: a valid bearer token (org defaults to
                           ``DEFAULT_ORG``).
``cluster_engine_client``   a ``cluster_engine.client.Client`` for ``DEFAULT_ORG`` with ``images:write``.
``cluster_engine_env``      sets ``CE_URL`` and ``CE_TOKEN`` (``DEFAULT_ORG``, ``images:write``) for the test,
                           so code under test that reads them (``Client()``, ``AsyncClient()``) finds the
                           server; ``.url``, ``.token``.
``cluster_engine_catalog``  ``.load(entries_or_path, replace=False)``: import a catalog (a list of entries,
                           or a YAML/JSON file) the way operators do, wait until it is served, and return
                           the loaded images; ``.clear()`` removes every image; ``aload``/``aclear`` are
                           the same for ``await``.

Every fixture is synchronous and safe to use from async tests (pytest-asyncio, anyio): what needs an event
loop runs on one of its own, in a thread. The server is started only by a test that asks for one of these
fixtures, once per session, and it is shared: images loaded by one test are seen by the next, unless the
test is marked ``@pytest.mark.cluster_engine_reset`` or the ini option ``cluster_engine_reset = true`` is set
(then every image is deleted before each test that uses the server). Importing this module costs nothing
beyond pytest: everything else is imported when a fixture is first used. See docs/pytest-plugin.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest

if TYPE_CHECKING:
    from .client import Client, ImageResp
    from .storage.store import Store
    from .testing import ExistingServer, LiveServer

    Server = LiveServer | ExistingServer

T = TypeVar("T")

DEFAULT_ORG = uuid.UUID("3f0c6c1e-8a53-4b0e-9d41-6a2f0e7b5c19")
"""The org of ``cluster_engine_client`` and of ``cluster_engine_token()`` without ``org``."""

RESET_MARKER = "cluster_engine_reset"


class TokenFactory(Protocol):
    """The type of ``cluster_engine_token``: ``(org=None, scopes=()) -> str``."""

    def __call__(self, org: uuid.UUID | str | None = None, scopes: Sequence[str] = ()) -> str: ...


@dataclass(frozen=True)
class Environment:
    """What ``cluster_engine_env`` exported: ``CE_URL`` and ``CE_TOKEN``."""

    url: str
    token: str


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cluster-engine", "cluster-engine plugin (cluster_engine_* fixtures)")
    group.addoption(
        "--cluster-engine-url",
        metavar="URL",
        default=None,
        help="Run against this already running server instead of starting one.",
    )
    group.addoption(
        "--cluster-engine-secret",
        metavar="SECRET",
        default=None,
        help="That server's CE_JWT_SECRET: tokens for any org and scope are minted with it.",
    )
    group.addoption(
        "--cluster-engine-token",
        metavar="TOKEN",
        default=None,
        help="A ready bearer token for that server (tests that need another org are skipped).",
    )
    group.addoption(
        "--cluster-engine-database-url",
        metavar="URL",
        default=None,
        help="That server's database (CE_DATABASE_URL): needed by cluster_engine_catalog.",
    )
    parser.addini(
        "cluster_engine_reset",
        type="bool",
        default=False,
        help="Delete every image before each test that uses the cluster_engine fixtures.",
    )


def pytest_configure(config: pytest.Config) -> None:
    given = [config.getoption(o) for o in ("cluster_engine_secret", "cluster_engine_token")]
    if config.getoption("cluster_engine_url") and not any(given):
        raise pytest.UsageError(
            "--cluster-engine-url needs --cluster-engine-secret or --cluster-engine-token"
        )
    config.addinivalue_line(
        "markers", f"{RESET_MARKER}: delete every image in the cluster-engine server before this test"
    )


class Catalog:
    """Loads catalog files into the session's server the way ``cluster-engine catalog import`` does (the
    same validation and the same one-transaction import into the server's database), then waits until
    the server serves the new revision."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def load(
        self, source: Sequence[dict[str, Any]] | str | Path, *, replace: bool = False
    ) -> list[ImageResp]:
        """Create or update the entries of ``source`` (entries, or a YAML/JSON catalog file); with
        ``replace``, also delete the Public images it does not list. Returns the images as now served,
        in the order of the entries. A catalog the import rejects raises ValueError, saying why."""
        import yaml

        from .invalid import Invalid
        from .rules.catalog_entries import read_catalog_entries
        from .server.errors import ApiError
        from .storage.errors import StoreError
        from .storage.records import Actor

        if isinstance(source, str | Path):
            entries = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        else:
            entries = list(source)
        actor = Actor(org_id=None, name="pytest:cluster_engine_catalog")
        try:
            parsed = read_catalog_entries(entries)
            report = self._in_store(lambda store: store.import_catalog(parsed, prune=replace, actor=actor))
        except Invalid as exc:
            lines = [f"{d.field}: {d.reason} (got {d.originalValue!r})" for d in exc.details]
            raise ValueError("\n".join([f"catalog rejected: {exc}", *lines])) from None
        except (ApiError, StoreError) as exc:
            raise ValueError(f"catalog rejected: {exc}") from None
        if report.revision is not None:
            self.server.wait_synced()
        return self._served(entries)

    async def aload(
        self, source: Sequence[dict[str, Any]] | str | Path, *, replace: bool = False
    ) -> list[ImageResp]:
        """``load`` for ``await``: the same, without blocking the caller's event loop."""
        import asyncio

        return await asyncio.to_thread(self.load, source, replace=replace)

    async def aclear(self) -> None:
        """``clear`` for ``await``."""
        import asyncio

        await asyncio.to_thread(self.clear)

    def clear(self) -> None:
        """Delete every image: Public ones and every org's Customized ones."""
        from .client import Client

        images = self._in_store(lambda store: store.export_catalog())
        with Client(self.server.url, self._token(DEFAULT_ORG, "images:admin"), retries=0) as admin:
            for image in images:
                admin.delete_image(image.id)
        self.server.wait_synced()

    def _in_store(self, work: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
        """Run ``work`` on the server's database, on an event loop and in a thread of its own (the caller
        may be inside an event loop, as async tests are)."""
        from .testing.stores import in_store

        database_url = self.server.database_url
        if database_url is None:
            raise RuntimeError(
                "cluster_engine_catalog against an existing server needs its database: "
                "--cluster-engine-database-url"
            )
        return in_store(database_url, work, statement_timeout=None)

    def _token(self, org: uuid.UUID | str, *scopes: str) -> str:
        return self.server.token(org, scopes=list(scopes))

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
def cluster_engine_server(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[Server]:
    """The session's cluster-engine server: started on a free loopback port with a temporary SQLite
    database, or the one ``--cluster-engine-url`` names. Needs the ``server`` extra (tokens are signed
    with PyJWT, the server is cluster-engine's own): without it the test errors with one line saying so."""
    from .extras import server_hint

    hint = server_hint("the cluster_engine_* fixtures")
    if hint is not None:
        pytest.fail(hint, pytrace=False)
    url = pytestconfig.getoption("cluster_engine_url")
    if url:
        yield _existing(pytestconfig, url)
        return
    from .testing import LiveServer

    with LiveServer.start(tmp_path_factory.mktemp("cluster-engine")) as server:
        yield server


def _existing(config: pytest.Config, url: str) -> ExistingServer:
    import httpx

    from .testing import ExistingServer

    url = url.rstrip("/")
    try:
        ready = httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    except httpx.HTTPError as exc:
        raise pytest.UsageError(f"--cluster-engine-url {url}: {exc}") from None
    if not ready:
        raise pytest.UsageError(f"--cluster-engine-url {url}: /readyz is not 200")
    secret, token = config.getoption("cluster_engine_secret"), config.getoption("cluster_engine_token")
    database_url = config.getoption("cluster_engine_database_url")
    return ExistingServer(url, secret=secret or None, fixed_token=token or None, database_url=database_url)


@pytest.fixture(scope="session")
def cluster_engine_token(cluster_engine_server: Server) -> TokenFactory:
    """``cluster_engine_token(org=None, scopes=())``: a bearer token the session's server accepts."""
    fixed = getattr(cluster_engine_server, "fixed_token", None)
    mints = getattr(cluster_engine_server, "secret", None) is not None

    def token(org: uuid.UUID | str | None = None, scopes: Sequence[str] = ()) -> str:
        if fixed is not None and not mints and org is not None and str(org) != str(DEFAULT_ORG):
            pytest.skip("a token for another org needs --cluster-engine-secret (only one token was given)")
        return cluster_engine_server.token(org if org is not None else DEFAULT_ORG, scopes=list(scopes))

    return token


@pytest.fixture
def cluster_engine_client(
    cluster_engine_server: Server, cluster_engine_token: TokenFactory
) -> Iterator[Client]:
    """A ``Client`` of the session's server for ``DEFAULT_ORG`` with the ``images:write`` scope."""
    from .client import Client

    with Client(cluster_engine_server.url, cluster_engine_token(scopes=["images:write"])) as client:
        yield client


@pytest.fixture
def cluster_engine_env(
    cluster_engine_server: Server, cluster_engine_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> Environment:
    """``CE_URL`` and ``CE_TOKEN`` (``DEFAULT_ORG``, ``images:write``) set for this test, restored after."""
    exported = Environment(cluster_engine_server.url, cluster_engine_token(scopes=["images:write"]))
    monkeypatch.setenv("CE_URL", exported.url)
    monkeypatch.setenv("CE_TOKEN", exported.token)
    return exported


@pytest.fixture
def cluster_engine_catalog(cluster_engine_server: Server) -> Catalog:
    """Load catalog fixtures into the session's server: ``cluster_engine_catalog.load(entries_or_path)``."""
    return Catalog(cluster_engine_server)


@pytest.fixture(autouse=True)
def _cluster_engine_reset(request: pytest.FixtureRequest) -> None:
    """Before a test that uses the server: delete every image, when it is marked or the ini option is on."""
    if "cluster_engine_server" not in request.fixturenames:
        return
    if request.node.get_closest_marker(RESET_MARKER) is None and not request.config.getini(RESET_MARKER):
        return
    catalog = request.getfixturevalue("cluster_engine_catalog")
    assert isinstance(catalog, Catalog)
    catalog.clear()


__all__ = ["DEFAULT_ORG", "Catalog", "Environment", "TokenFactory"]
