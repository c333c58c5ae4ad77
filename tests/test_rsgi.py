"""The service over granian's RSGI interface (server/rsgi.py, server/rsgibridge.py) answers exactly what it
answers over ASGI.

Two real ``serve`` processes on one SQLite database and one JWT secret, one per CE_SERVER_INTERFACE, get
the same requests: status, every header in order (but Date) and the bytes must be equal. Three
configurations: plain (the read path answered by rsgi.py, the rest bridged), CE_ROOT_PATH (the prefix rule
on the RSGI read path) and CORS with the rate limiter (every request through the bridge). Writes go to
orgs of their own, so the read comparisons never race a poll.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster_engine.cli.main import DEMO_ORG
from cluster_engine.server.auth import mint_token
from cluster_engine.testing import LiveServer, image_body

from .conftest import OTHER_ORG

CONFIGS = {
    "plain": {},
    "root-path": {"CE_ROOT_PATH": "/gateway"},
    "bridged": {"CE_CORS_ORIGINS": "https://console.example.com", "CE_RATE_LIMIT": "100000/100000"},
}
WRITE = "images:write"
Pair = tuple[LiveServer, LiveServer]
_counter = iter(range(1_000_000))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    directory = tmp_path_factory.mktemp(f"rsgi-{request.param}")
    env = {"CE_HTTP_BODY_TIMEOUT": "1", **CONFIGS[request.param]}
    url = f"sqlite:///{directory / 'catalog.db'}"
    with LiveServer.start(
        directory / "asgi", database_url=url, env={**env, "CE_SERVER_INTERFACE": "asgi"}, args=["--demo"]
    ) as asgi:
        rsgi_env = {**env, "CE_SERVER_INTERFACE": "rsgi", "CE_JWT_SECRET": asgi.secret}
        with LiveServer.start(directory / "rsgi", database_url=url, env=rsgi_env) as rsgi:
            yield asgi, rsgi


def _request_id() -> str:
    return f"rsgi-test-{next(_counter)}"


def _send(
    server: LiveServer,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    body: Any = None,
) -> httpx.Response:
    content = None if body is None else json.dumps(body).encode()
    if content is not None:
        headers = [*headers, ("Content-Type", "application/json")]
    with httpx.Client(timeout=10) as client:  # a fresh connection each: answers may close theirs
        return client.request(method, f"{server.url}{path}", headers=list(headers), content=content)


def _shown(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers but Date (the server's own address as ``SERVER``, for redirects), bytes."""
    own = f"{response.url.host}:{response.url.port}".encode()
    headers = [(k, v.replace(own, b"SERVER")) for k, v in response.headers.raw if k.lower() != b"date"]
    return response.status_code, headers, response.content


def _both(
    pair: Pair, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: Any = None
) -> tuple[httpx.Response, httpx.Response]:
    """The same request to both servers, each with the same X-Request-ID (unless ``headers`` has one)."""
    if not any(name.lower() == "x-request-id" for name, _ in headers):
        headers = [*headers, ("X-Request-ID", _request_id())]
    asgi, rsgi = pair
    return _send(asgi, method, path, headers, body), _send(rsgi, method, path, headers, body)


def _same(pair: Pair, method: str, path: str, headers: Sequence[tuple[str, str]] = ()) -> httpx.Response:
    over_asgi, over_rsgi = _both(pair, method, path, headers)
    assert _shown(over_rsgi) == _shown(over_asgi)
    return over_rsgi


def _auth(pair: Pair, org: uuid.UUID = DEMO_ORG, scopes: Sequence[str] = ()) -> tuple[str, str]:
    return ("Authorization", f"Bearer {pair[0].token(org, scopes=scopes)}")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images",
        "/v1/images?idc=us-west-1",
        "/v1/images?idc=us-west-1&product=gpu.h100.8x",
        "/v1/images?product=gpu.h100.8x&idc=us-west-1&idc=us-east-1",
        "/v1/images?limit=2",
        "/v1/images?limit=0",
        "/v1/images?idc=nowhere",
        "/v1/images?cursor=not-a-cursor",
        "/v1/images?unknown=1",
        "/v1/images?idc=%E2%82%AC",
        "/api/v1/images?limit=2",
        "/gateway/v1/images?limit=1",
        "/gateway/api/v1/images?limit=1",
        "/v1/images/",
        "/v1/images/not-a-uuid",
        f"/v1/images/{uuid.UUID(int=7)}",
        f"/api/v1/images/{uuid.UUID(int=7)}",
        "/v1/images/a%2Fb",
        "/v1/imagesx",
        "/apix/v1/images",
    ],
)
def test_reads_answer_the_same_over_both_interfaces(pair: Pair, path: str) -> None:
    _same(pair, "GET", path, [_auth(pair)])
    _same(pair, "GET", path, [_auth(pair, OTHER_ORG)])


def test_every_page_and_image_is_the_same_and_revalidates_the_same(pair: Pair) -> None:
    auth = _auth(pair)
    path = "/v1/images?limit=2"
    pages = 0
    while path:
        page = _same(pair, "GET", path, [auth])
        assert page.status_code == 200
        etag = page.headers["etag"]
        for match in (etag, f"W/{etag}", "*", f'"other", {etag}'):
            assert _same(pair, "GET", path, [auth, ("If-None-Match", match)]).status_code == 304
        assert _same(pair, "GET", path, [auth, ("If-None-Match", '"other"')]).status_code == 200
        for image in page.json():
            one = _same(pair, "GET", f"/v1/images/{image['id']}", [auth])
            assert one.status_code == 200 and one.json() == image
            revalidated = [auth, ("If-None-Match", one.headers["etag"])]
            assert _same(pair, "GET", f"/v1/images/{image['id']}", revalidated).status_code == 304
        link = re.match(r"<([^>]+)>", page.headers.get("link", ""))
        path = link.group(1) if link else ""
        if path.startswith("/gateway"):  # CE_ROOT_PATH: the proxy in front strips it
            path = path[len("/gateway") :]
        pages += 1
    assert pages > 1


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Authorization", "Bearer not-a-token")],
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "Bearer")],
        [("Authorization", "bearer a.b.c")],
    ],
)
def test_refusals_are_the_same(pair: Pair, headers: list[tuple[str, str]]) -> None:
    for path in ("/v1/images", f"/v1/images/{uuid.UUID(int=7)}", "/api/v1/images"):
        assert _same(pair, "GET", path, headers).status_code == 401


def test_several_authorizations_expired_tokens_and_request_ids(pair: Pair) -> None:
    asgi, _ = pair
    token = asgi.token(DEMO_ORG)
    several = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    assert _same(pair, "GET", "/v1/images", several).status_code == 401
    expired = mint_token(asgi.secret, DEMO_ORG, ttl=-3600)
    assert _same(pair, "GET", "/v1/images", [("Authorization", f"Bearer {expired}")]).status_code == 401
    for unusable in ("", "has space", "x" * 129, "a/b"):  # replaced by an id of the server's own
        over_asgi, over_rsgi = _both(pair, "GET", "/v1/images", [_auth(pair), ("X-Request-ID", unusable)])
        ids = over_asgi.headers["x-request-id"], over_rsgi.headers["x-request-id"]
        assert all(re.fullmatch(r"[0-9a-f]+-[0-9a-f]+-[0-9a-f]+", rid) for rid in ids), ids
        without = [(k, v) for k, v in _shown(over_asgi)[1] if k != b"x-request-id"]
        assert [(k, v) for k, v in _shown(over_rsgi)[1] if k != b"x-request-id"] == without
    first, second = ("X-Request-ID", "first"), ("X-Request-ID", "second")
    assert _same(pair, "GET", "/v1/images", [_auth(pair), first, second]).headers["x-request-id"] == "first"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("HEAD", "/v1/images"),
        ("HEAD", "/api/v1/images?limit=1"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("GET", "/openapi.yaml"),
        ("GET", "/docs"),
        ("GET", "/api/docs"),
        ("GET", "/docs/assets/swagger-ui.css"),
        ("GET", "/nowhere"),
        ("PUT", "/v1/images"),
        ("OPTIONS", "/v1/images"),
        ("DELETE", "/v1/images"),
    ],
)
def test_everything_else_is_bridged_with_the_same_answers(pair: Pair, method: str, path: str) -> None:
    _same(pair, method, path, [_auth(pair), ("Origin", "https://console.example.com")])


def test_a_cors_preflight_is_the_same(pair: Pair) -> None:
    preflight = [
        ("Origin", "https://console.example.com"),
        ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "authorization"),
    ]
    _same(pair, "OPTIONS", "/v1/images", preflight)
    _same(pair, "GET", "/v1/images", [_auth(pair), ("Origin", "https://console.example.com")])


def _comparable(response: httpx.Response) -> tuple[int, list[bytes], Any]:
    """A write's answer without what differs between two writes: ids, times, ETags, Location."""
    body = response.json() if response.content else None
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "createdAt", "updatedAt")}
    return response.status_code, [k for k, _ in response.headers.raw if k != b"date"], body


def test_writes_through_the_bridge_answer_the_same(pair: Pair) -> None:
    asgi, rsgi = pair
    org = uuid.uuid4()
    reader, writer = _auth(pair, org), _auth(pair, org, [WRITE])
    body = image_body(org, "Bridge-1")
    assert _comparable(_send(asgi, "POST", "/v1/images", [reader], body)) == _comparable(
        _send(rsgi, "POST", "/v1/images", [reader], body)
    )  # 403: no write scope, answered before the body was read
    bad = {**body, "idc": ""}
    refused = [_send(server, "POST", "/v1/images", [writer], bad) for server in pair]
    assert refused[0].status_code == 400 and _shown(refused[1])[::2] == _shown(refused[0])[::2]
    created = [
        _send(server, "POST", "/api/v1/images", [writer], image_body(org, f"Bridge-{server is rsgi}"))
        for server in pair
    ]
    assert created[0].status_code == 201
    assert _comparable(created[1])[:2] == _comparable(created[0])[:2]
    assert all("/api/v1/images/" in c.headers["location"] for c in created)
    image = created[1].json()
    assert image["name"] == "Bridge-True" and image["orgId"] == str(org)
    # the image written over RSGI is served by the ASGI server once it has polled, and the same way
    deadline = time.monotonic() + 10
    while _send(asgi, "GET", f"/v1/images/{image['id']}", [reader]).status_code != 200:
        assert time.monotonic() < deadline, "the write never reached the other server"
        time.sleep(0.05)
    patched = [
        _send(
            server,
            "PATCH",
            f"/v1/images/{c.json()['id']}",
            [writer],
            {"icon": "https://static.example.com/other.svg"},
        )
        for server, c in zip(pair, created, strict=True)
    ]
    assert patched[0].status_code == 200 and _comparable(patched[1])[:2] == _comparable(patched[0])[:2]
    deleted = [
        _send(server, "DELETE", f"/v1/images/{c.json()['id']}", [writer])
        for server, c in zip(pair, created, strict=True)
    ]
    assert deleted[0].status_code == 204 and _shown(deleted[1])[::2] == _shown(deleted[0])[::2]


def _raw_exchange(server: LiveServer, *requests: bytes, pause: float = 0.0) -> bytes:
    """Send ``requests`` on one connection (``pause`` seconds after the first) and read until it closes."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(requests[0])
        time.sleep(pause)
        for request in requests[1:]:
            sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _statuses(received: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3})", received)


def test_an_unread_body_leaves_the_connection_usable_over_both(pair: Pair) -> None:
    body = json.dumps(image_body(DEMO_ORG)).encode()
    for server in pair:
        token = server.token(DEMO_ORG)
        post = (
            f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        get = f"GET /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n"
        received = _raw_exchange(server, post, body + get.encode() + b"\r\n", pause=0.2)
        assert _statuses(received) == [b"403", b"200"], received[:300]


def test_a_slow_body_is_a_408_over_both(pair: Pair) -> None:
    answers = []
    for server in pair:
        token = server.token(DEMO_ORG, scopes=[WRITE])
        head = (
            f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        ).encode()
        received = _raw_exchange(server, head)  # the rest never comes: CE_HTTP_BODY_TIMEOUT (1 s)
        answers.append(received)
        assert _statuses(received) == [b"408"], received[:300]
        assert b"connection: close" in received.lower()
    assert answers[0].split(b"\r\n\r\n")[1] == answers[1].split(b"\r\n\r\n")[1]


def _requests_counted(server: LiveServer, route: str, status: int) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = (
        rf'^ce_http_requests_total\{{method="GET",route="{re.escape(route)}",status="{status}"\}} (\S+)$'
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_metrics_and_access_log_lines_are_the_same(pair: Pair) -> None:
    asgi, rsgi = pair
    auth = _auth(pair)
    before = [
        (_requests_counted(server, "/v1/images", 200), _requests_counted(server, "/v1/images/{id}", 404))
        for server in pair
    ]
    rid = _request_id()
    for _ in range(3):
        _both(pair, "GET", "/api/v1/images?limit=1", [auth, ("X-Request-ID", rid)])
    _both(pair, "GET", f"/v1/images/{uuid.UUID(int=7)}", [auth, ("X-Request-ID", rid)])
    after = [
        (_requests_counted(server, "/v1/images", 200), _requests_counted(server, "/v1/images/{id}", 404))
        for server in pair
    ]
    for (lists, gets), (lists_after, gets_after) in zip(before, after, strict=True):
        assert (lists_after - lists, gets_after - gets) == (3, 1)
    lines = [_access_lines(server, rid, 4) for server in (asgi, rsgi)]
    assert lines[1] == lines[0]
    assert [line["status"] for line in lines[0]] == [200, 200, 200, 404]
    assert all(line["orgId"] == str(DEMO_ORG) for line in lines[0])


def _access_lines(server: LiveServer, request_id: str, count: int) -> list[dict[str, Any]]:
    """The access-log lines of ``request_id`` (without time and duration), once ``count`` are written
    (the log is written in batches, 50 ms after a request)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [
            {k: v for k, v in entry.items() if k not in ("time", "durationMs")}
            for entry in _log_entries(server.log_path)
            if entry.get("logger") == "access" and entry.get("requestId") == request_id
        ]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _log_entries(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _compared(received: bytes) -> tuple[list[bytes], list[bytes], bytes]:
    """A raw answer's statuses, header lines (lower case, without Date and X-Request-ID) and body."""
    head, _, body = received.partition(b"\r\n\r\n")
    kept = [
        line for line in head.lower().split(b"\r\n")[1:] if not line.startswith((b"date:", b"x-request-id:"))
    ]
    return _statuses(received), kept, body


def test_an_authorization_of_bytes_rsgi_cannot_show_is_refused_as_invalid(pair: Pair) -> None:
    """Granian's RSGI leaves out header values that are not visible ASCII: such a token is still the
    same 401 (invalid token) as over ASGI, natively read and bridged."""
    for method in (b"GET", b"POST"):
        request = method + b" /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe.\x80.\x81\r\n"
        request += b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        over_asgi, over_rsgi = (_compared(_raw_exchange(server, request)) for server in pair)
        assert over_rsgi == over_asgi
        assert over_asgi[0] == [b"401"] and b'error="invalid_token"' in b"".join(over_asgi[1])


def test_a_client_gone_mid_body_leaves_both_serving(pair: Pair) -> None:
    for server in pair:
        token = server.token(DEMO_ORG, scopes=[WRITE])
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"idc": '.encode()
            )
        assert _send(server, "GET", "/v1/images", [_auth(pair)]).status_code == 200
