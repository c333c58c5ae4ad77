"""The Python SDK (``cluster_engine.client``): ``Client`` and ``AsyncClient`` against a real server.

Each behaviour is written once as a coroutine over ``Api``, a small facade that awaits the async client
and calls the sync one, and runs for both clients (``mode``). Retries and 503s are simulated with
``httpx.MockTransport`` (the real server answers 503 only when its database is down), with the clients'
sleeps recorded instead of slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import types
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from cluster_engine.client import (
    AsyncClient,
    AuthError,
    Client,
    ClusterEngineError,
    Conflict,
    Error,
    ErrorStatusMessage,
    Forbidden,
    ImageCreateReq,
    ImageResp,
    ImageType,
    NotFound,
    PayloadTooLarge,
    Retry,
    ServerError,
    ServiceUnavailable,
    TransportError,
    ValidationDetail,
    ValidationError,
    _async,
    _sync,
    errors,
)
from cluster_engine.client._responses import parse_retry_after
from cluster_engine.testing import LiveServer, free_port, image_body

WRITE, ADMIN = "images:write", "images:admin"


def spec(org: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    """A valid ImageCreateReq body for ``org``."""
    return image_body(org, **{"name": "Ubuntu-24.04", "OSVersion": "24.04", **overrides})


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module; tests keep apart by each using fresh orgs (Customized images only)."""
    with LiveServer.start(tmp_path_factory.mktemp("sdk")) as server:
        yield server


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


class Api:
    """``Client`` or ``AsyncClient`` behind one awaitable interface."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        method = getattr(self.client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return call

    async def iter_all(self, *args: Any, **kwargs: Any) -> list[ImageResp]:
        images = self.client.iter_images(*args, **kwargs)
        if isinstance(images, AsyncIterator):
            return [image async for image in images]
        return list(images)


@contextlib.asynccontextmanager
async def connect(mode: str, *args: Any, transport: Any = None, **kwargs: Any) -> AsyncIterator[Api]:
    if mode == "sync":
        with Client(*args, transport=transport, **kwargs) as client:
            yield Api(client)
    else:
        async with AsyncClient(*args, transport=transport, **kwargs) as aclient:
            yield Api(aclient)


# ------------------------------------------------------------------------------------ the calls


def test_every_call_against_a_real_server(live: LiveServer, mode: str) -> None:
    org = uuid.uuid4()

    async def body() -> None:
        async with connect(mode, live.url, live.token(org, scopes=[WRITE])) as api:
            assert await api.list_images() == []
            typed = msgspec.convert(spec(org), ImageCreateReq)
            first = await api.create_image(typed)
            assert isinstance(first, ImageResp)
            assert first.type is ImageType.CUSTOMIZED and first.orgId == org and first.name == "Ubuntu-24.04"
            second = await api.create_image(
                spec(org, name="Rocky-9", idc="us-east-2", supportedProducts=["gpu.l40s.4x"]),
                type="Customized",
            )
            third = await api.create_image(
                spec(org, name="Debian-12", BootMode="Legacy"), type=ImageType.CUSTOMIZED
            )

            assert await api.get_image(first.id) == first
            assert await api.get_image(str(second.id)) == second
            everything = await api.list_images()
            assert [i.id for i in everything] == [first.id, second.id, third.id]  # createdAt, then id
            assert [i.id for i in await api.list_images(idc="us-east-2")] == [second.id]
            assert [i.id for i in await api.list_images(product="gpu.b200.8x")] == [first.id, third.id]
            assert await api.list_images(idc="us-west-1", product="gpu.l40s.4x") == []
            assert await api.list_images(limit=1) == everything
            assert await api.list_images(idc="us-west-1", limit=1) == [first, third]
            assert await api.iter_all(page_size=2) == everything
            assert await api.iter_all(product="gpu.b200.8x", page_size=1) == [first, third]

            updated = await api.update_image(
                first.id, {"name": "Ubuntu-24.04-LTS", "supportedProducts": ["x.1"]}
            )
            assert (updated.id, updated.name, updated.supportedProducts) == (
                first.id,
                "Ubuntu-24.04-LTS",
                ["x.1"],
            )
            assert updated.createdAt == first.createdAt and updated.OSVersion == "24.04"
            assert await api.get_image(first.id) == updated

            assert await api.delete_image(first.id) is None
            with pytest.raises(NotFound):
                await api.get_image(first.id)
            with pytest.raises(NotFound):
                await api.delete_image(first.id)
            assert [i.id for i in await api.list_images()] == [second.id, third.id]

    run(body)


def test_errors_carry_the_contract_bodies(live: LiveServer, mode: str) -> None:
    org, stranger = uuid.uuid4(), uuid.uuid4()

    async def body() -> None:
        async with connect(mode, live.url, "not-a-jwt") as api:
            with pytest.raises(AuthError) as invalid:
                await api.list_images()
        assert (invalid.value.status, invalid.value.code, invalid.value.message) == (
            401,
            0,
            "Invalid access token.",
        )
        assert invalid.value.body == ErrorStatusMessage(
            code=0, group="auth_verify", message="Invalid access token."
        )
        async with connect(mode, live.url, live.token(org, ttl=-60)) as api:
            with pytest.raises(AuthError) as expired:
                await api.get_image(uuid.uuid4())
        assert (expired.value.code, expired.value.message) == (1, "Expired access token.")
        async with connect(mode, live.url, "") as api:  # no Authorization header at all
            with pytest.raises(AuthError) as missing:
                await api.list_images()
        assert missing.value.code == 0

        async with connect(mode, live.url, live.token(org, scopes=[WRITE])) as api:
            with pytest.raises(ValidationError) as bad_query:
                await api.list_images(idc="us west")
            assert bad_query.value.status == 400
            assert bad_query.value.details == [
                ValidationDetail(
                    field="idc",
                    expression="pattern",
                    reason="Must match the pattern ^[a-zA-Z0-9._-]+$.",
                    originalValue="us west",
                    argument="^[a-zA-Z0-9._-]+$",
                )
            ]
            assert "idc: Must match the pattern" in str(bad_query.value)

            with pytest.raises(ValidationError) as bad_body:
                await api.create_image(spec(org, idc="us west", BootMode="BIOS", icon=None))
            assert {d.field for d in bad_body.value.details} >= {"idc", "BootMode", "icon"}
            assert (
                isinstance(bad_body.value.body, ErrorStatusMessage) and bad_body.value.body.group == "request"
            )

            with pytest.raises(ValidationError) as bad_id:
                await api.get_image("not-a-uuid")
            assert [d.field for d in bad_id.value.details] == ["id"]

            image = await api.create_image(spec(org))
            with pytest.raises(Conflict) as duplicate:
                await api.create_image(spec(org))
            assert duplicate.value.status == 409 and isinstance(duplicate.value.body, Error)
            assert "already exists" in duplicate.value.message

            with pytest.raises(NotFound) as missing_image:
                await api.get_image(uuid.uuid4())
            assert missing_image.value.body == Error(reason="image not found")

            with pytest.raises(Forbidden) as forbidden:
                await api.create_image(spec(org, name="Public-Image"), type="Public")
            assert forbidden.value.status == 403 and "images:admin" in forbidden.value.message
            with pytest.raises(Forbidden):
                await api.create_image(spec(stranger))  # images:write is for the caller's own org

        async with connect(mode, live.url, live.token(stranger, scopes=[WRITE])) as other:
            with pytest.raises(NotFound):  # hidden is indistinguishable from missing
                await other.get_image(image.id)
            with pytest.raises(NotFound):
                await other.delete_image(image.id)

    run(body)


TOO_LARGE = {"path": "x" * (1024 * 1024 + 1)}


def test_payload_too_large(live: LiveServer, mode: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            413, json={"reason": "request body is larger than 1 MiB"}, headers={"Connection": "close"}
        )

    async def body() -> None:
        async with connect(mode, "http://ce.test", "t", transport=httpx.MockTransport(handler)) as api:
            with pytest.raises(PayloadTooLarge) as mocked:
                await api.update_image(uuid.uuid4(), TOO_LARGE)
            assert (mocked.value.status, mocked.value.body) == (
                413,
                Error(reason="request body is larger than 1 MiB"),
            )

    run(body)
    org = uuid.uuid4()
    with Client(live.url, live.token(org, scopes=[WRITE]), retries=0) as client:
        image = client.create_image(spec(org))
        with pytest.raises(PayloadTooLarge) as real:
            client.update_image(image.id, TOO_LARGE)
        assert real.value.message == "request body is larger than 1 MiB"


def test_payload_too_large_reaches_async_clients(live: LiveServer) -> None:
    org = uuid.uuid4()

    async def body() -> None:
        async with AsyncClient(live.url, live.token(org, scopes=[WRITE]), retries=0) as client:
            for _ in range(10):
                with pytest.raises(PayloadTooLarge):
                    await client.update_image(uuid.uuid4(), TOO_LARGE)

    run(body)


def test_error_tree() -> None:
    for name in errors.__all__:
        kind = getattr(errors, name)
        assert issubclass(kind, ClusterEngineError)
        assert name in (errors.__doc__ or ""), f"{name} is missing from the drawn tree"
    assert issubclass(ServiceUnavailable, ServerError)
    assert not issubclass(TransportError, ServerError)


# ----------------------------------------------------------------------- retries, with a mock transport


class Recorder:
    """Replaces the sleeps of both clients' send loops; records the delays asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.delays: list[float] = []

        async def asleep(delay: float) -> None:
            self.delays.append(delay)

        monkeypatch.setattr(_sync, "time", types.SimpleNamespace(sleep=self.delays.append))
        monkeypatch.setattr(_async, "asyncio", types.SimpleNamespace(sleep=asleep))


def unavailable(retry_after: str | None = "2") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(503, json={"reason": "database is unavailable"}, headers=headers)


IMAGE = msgspec.json.encode(
    {
        **spec(uuid.UUID(int=1)),
        "id": str(uuid.UUID(int=2)),
        "type": "Public",
        "createdAt": "2026-01-01T00:00:00Z",
    }
)


def test_idempotent_calls_are_retried_on_503_honouring_retry_after(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = Recorder(monkeypatch)
    answers = [unavailable("2"), unavailable("1"), httpx.Response(200, content=b"[" + IMAGE + b"]")]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return answers.pop(0)

    async def body() -> None:
        async with connect(mode, "http://ce.test", "t", transport=httpx.MockTransport(handler)) as api:
            images = await api.list_images()
        assert [i.id for i in images] == [uuid.UUID(int=2)]

    run(body)
    assert seen == ["GET"] * 3
    assert len(sleeps.delays) == 2 and sleeps.delays[0] >= 2 and sleeps.delays[1] >= 1  # at least Retry-After


def test_503_after_the_last_retry_raises_service_unavailable(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = Recorder(monkeypatch)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return unavailable("3600")

    async def body() -> None:
        retry = Retry(total=2, backoff=0.1, max_delay=5.0)
        async with connect(
            mode, "http://ce.test", "t", transport=httpx.MockTransport(handler), retries=retry
        ) as api:
            for call in (api.get_image(uuid.uuid4()), api.delete_image(uuid.uuid4())):
                with pytest.raises(ServiceUnavailable) as exc:
                    await call
                assert (exc.value.status, exc.value.retry_after) == (503, 3600.0)
                assert exc.value.body == Error(reason="database is unavailable")
                assert isinstance(exc.value, ServerError)

    run(body)
    assert calls == ["GET"] * 3 + ["DELETE"] * 3
    assert sleeps.delays == [5.0] * 4  # Retry-After honoured, but capped at max_delay


def test_post_and_patch_are_never_retried(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = Recorder(monkeypatch)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.url.path.endswith("/boom"):
            raise httpx.ConnectError("connection refused", request=request)
        return unavailable()

    async def body() -> None:
        async with connect(mode, "http://ce.test", "t", transport=httpx.MockTransport(handler)) as api:
            with pytest.raises(ServiceUnavailable) as created:
                await api.create_image(spec(uuid.uuid4()))
            assert created.value.retry_after == 2.0
            with pytest.raises(ServiceUnavailable):
                await api.update_image(uuid.uuid4(), {"name": "x"})
            with pytest.raises(TransportError):
                await api.update_image("boom", {"name": "x"})

    run(body)
    assert calls == ["POST", "PATCH", "PATCH"]
    assert sleeps.delays == []


def test_connection_errors_are_retried_with_exponential_backoff(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = Recorder(monkeypatch)
    failures = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("reset")]

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            failure = failures.pop(0)
            failure.request = request
            raise failure
        return httpx.Response(200, content=IMAGE)

    async def body() -> None:
        retry = Retry(total=3, backoff=1.0, max_delay=100.0)
        async with connect(
            mode, "http://ce.test", "t", transport=httpx.MockTransport(handler), retries=retry
        ) as api:
            assert (await api.get_image(uuid.UUID(int=2))).id == uuid.UUID(int=2)

    run(body)
    assert len(sleeps.delays) == 3
    for attempt, delay in enumerate(sleeps.delays):  # backoff * 2**attempt, with jitter in [½, 1]
        assert 2**attempt / 2 <= delay <= 2**attempt


def test_a_connection_closed_before_any_response_byte(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled connection the server closed (httpcore: "Server disconnected without sending a response"):
    an idempotent call is sent again at once; POST and PATCH are not, and say they may have been applied."""
    sleeps = Recorder(monkeypatch)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) in (1, 3, 4):
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        return httpx.Response(200, content=IMAGE)

    async def body() -> None:
        async with connect(mode, "http://ce.test", "t", transport=httpx.MockTransport(handler)) as api:
            assert (await api.get_image(uuid.UUID(int=2))).id == uuid.UUID(int=2)
            with pytest.raises(TransportError, match="may have applied it") as created:
                await api.create_image(spec(uuid.uuid4()))
            assert "POST http://ce.test/v1/images: connection failed" in created.value.message
            with pytest.raises(TransportError, match="may have applied it"):
                await api.update_image(uuid.UUID(int=2), {"name": "x"})

    run(body)
    assert calls == ["GET", "GET", "POST", "PATCH"]
    assert sleeps.delays == [0.0]  # no backoff for a stale connection


def test_transport_error_on_a_closed_port(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = Recorder(monkeypatch)
    url = f"http://127.0.0.1:{free_port()}"

    async def body() -> None:
        async with connect(mode, url, "t", retries=2) as api:
            with pytest.raises(TransportError) as exc:
                await api.list_images()
        assert exc.value.status is None and exc.value.body is None
        assert "connection failed" in exc.value.message and url in exc.value.message
        async with connect(mode, url, "t", retries=0) as api:
            with pytest.raises(TransportError):
                await api.get_image(uuid.uuid4())

    run(body)
    assert len(sleeps.delays) == 2


def test_timeouts(mode: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async def body() -> None:
        async with connect(
            mode, "http://ce.test", "t", transport=httpx.MockTransport(handler), retries=0
        ) as api:
            assert api.client.timeout == httpx.Timeout(10.0)  # on by default
            with pytest.raises(TransportError, match="timed out"):
                await api.list_images()
        async with connect(mode, "http://ce.test", "t", timeout=0.5) as api:
            assert api.client.timeout == httpx.Timeout(0.5)

    run(body)


def test_responses_that_are_not_the_contracts(mode: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/images":
            return httpx.Response(200, text="<html>login</html>")
        return httpx.Response(502, text="<html>bad gateway</html>")

    async def body() -> None:
        async with connect(
            mode, "http://ce.test", "t", transport=httpx.MockTransport(handler), retries=0
        ) as api:
            with pytest.raises(ClusterEngineError) as garbled:
                await api.list_images()
            assert type(garbled.value) is ClusterEngineError and garbled.value.status == 200
            with pytest.raises(ServerError) as gateway:
                await api.get_image(uuid.uuid4())
            assert (gateway.value.status, gateway.value.body, gateway.value.message) == (
                502,
                None,
                "HTTP 502 Bad Gateway",
            )

    run(body)


def test_absolute_link_headers_are_followed(mode: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if "cursor" not in request.url.params:
            link = '<http://ce.test/v1/images?limit=1&cursor=abc>; rel="next"'
            return httpx.Response(200, content=b"[" + IMAGE + b"]", headers={"Link": link})
        return httpx.Response(200, content=b"[]")

    async def body() -> None:
        async with connect(mode, "http://ce.test", "t", transport=httpx.MockTransport(handler)) as api:
            assert len(await api.list_images(limit=1)) == 1

    run(body)
    assert seen == ["http://ce.test/v1/images?limit=1", "http://ce.test/v1/images?limit=1&cursor=abc"]


def test_retry_after_as_an_http_date() -> None:
    now = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("Fri, 01 May 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Fri, 01 May 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# -------------------------------------------------------------------------------- conditional GETs


class Recording(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str | None, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.log.append((request.method, request.headers.get("If-None-Match"), response.status_code))
        return response


class AsyncRecording(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str | None, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.log.append((request.method, request.headers.get("If-None-Match"), response.status_code))
        return response


def test_cache_revalidates_with_if_none_match_and_serves_304s(live: LiveServer, mode: str) -> None:
    org = uuid.uuid4()
    transport = Recording() if mode == "sync" else AsyncRecording()

    async def body() -> None:
        async with connect(
            mode, live.url, live.token(org, scopes=[WRITE]), cache=True, transport=transport
        ) as api:
            image = await api.create_image(spec(org))
            assert await api.get_image(image.id) == image
            assert await api.get_image(image.id) == image  # answered 304, value from the cache
            listed = await api.list_images()
            assert await api.list_images() == listed == [image]
            assert await api.iter_all(page_size=1) == [image]
            assert await api.iter_all(page_size=1) == [image]
            changed = await api.update_image(image.id, {"name": "Renamed"})
            assert await api.get_image(image.id) == changed  # a new ETag: 200, cache refreshed
            assert await api.get_image(image.id) == changed
        async with connect(mode, live.url, live.token(org)) as plain:
            assert await plain.get_image(image.id) == changed

    run(body)
    log = transport.log
    assert log[0] == ("POST", None, 201)
    assert log[1] == ("GET", None, 200)
    assert log[2][0] == "GET" and log[2][1] and log[2][2] == 304
    assert [status for _, _, status in log[3:7]] == [200, 304, 200, 304]
    assert all(etag for _, etag, status in log[3:7] if status == 304)
    assert log[7] == ("PATCH", None, 200)
    assert log[8][1] == log[2][1] and log[8][2] == 200  # stale ETag sent, fresh body back
    assert log[9][2] == 304


def test_no_cache_by_default(live: LiveServer) -> None:
    transport = Recording()
    with Client(live.url, live.token(uuid.uuid4()), transport=transport) as client:
        client.list_images()
        client.list_images()
    assert [(etag, status) for _, etag, status in transport.log] == [(None, 200), (None, 200)]


# --------------------------------------------------------------------------------- configuration


def test_url_and_token_from_the_environment(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    org = uuid.uuid4()
    monkeypatch.setenv("CE_URL", live.url)
    monkeypatch.setenv("CE_TOKEN", live.token(org, scopes=[WRITE]))
    with Client() as client:
        created = client.create_image(spec(org))
        assert client.list_images() == [created]

    async def body() -> None:
        async with AsyncClient() as aclient:
            assert await aclient.get_image(created.id) == created

    run(body)

    monkeypatch.setenv("CE_URL", f"http://127.0.0.1:{free_port()}")  # arguments win over the environment
    monkeypatch.setenv("CE_TOKEN", "not-a-jwt")
    with Client(live.url, live.token(org)) as client:
        assert client.get_image(created.id) == created

    monkeypatch.delenv("CE_URL")
    with pytest.raises(ValueError, match="CE_URL"):
        Client()
    for wrong in ("127.0.0.1:8080", "ftp://ce.test", "http://"):
        with pytest.raises(ValueError, match="server URL"):
            AsyncClient(wrong)


def test_package_exports() -> None:
    import cluster_engine.client as sdk

    for name in sdk.__all__:
        assert getattr(sdk, name) is not None
    assert sdk.ImageResp is ImageResp and sdk.Partition.__module__ == "cluster_engine.schemas"
    with Client("http://ce.test/") as client:
        assert repr(client) == "Client(base_url='http://ce.test')"
