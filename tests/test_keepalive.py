"""Keep-alive after answers that did not read the request body (keepalive.py), against a real server.

The flake this guards against (issue #16): a POST the server answered (403: no write scope) before its
body arrived left a connection that the server closed after an answer without ``Connection: close``; the
client's next request on it failed with "Server disconnected without sending a response". Here the body is
sent only after a pause, so without the guard the answer comes first. With it, the server reads the body
before answering and the connection serves the next request; a body it cannot read says
``Connection: close``.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_engine.testing import LiveServer

BODY = b'{"name": "x"}'
BOUND = 30.0  # seconds: a liveness bound far above every timeout configured here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer.start(tmp_path_factory.mktemp("keepalive"), env={"CE_ACCESS_LOG": "false"}) as server:
        yield server


def _connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=BOUND)
    return sock


def _post_head(token: str | None, length: int) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST /v1/images HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, lower-cased headers, body) read from ``sock``; b"" when the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(lines[0].split(" ")[1]), headers, body


def _closed(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


def test_a_body_sent_after_the_head_is_read_and_the_connection_is_reused(server: LiveServer) -> None:
    reader = server.token(uuid.uuid4())  # no write scope: 403, decided from the headers alone
    with _connect(server) as sock:
        sock.sendall(_post_head(reader, len(BODY)))
        time.sleep(0.2)  # ordering, not timing: without the guard the 403 is written before the body lands
        sock.sendall(BODY)
        status, headers, _ = _read_answer(sock)
        assert status == 403 and headers.get("connection") != "close"
        sock.sendall(f"GET /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {reader}\r\n\r\n".encode())
        status, _, body = _read_answer(sock)  # the same connection carries the next request
        assert status == 200 and body == b"[]"


def test_a_body_too_large_to_read_is_answered_with_connection_close(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_post_head(None, 2 * 1024 * 1024))  # no token: 401; the body is never sent
        status, headers, _ = _read_answer(sock)
        assert status == 401 and headers["connection"] == "close"
        assert _closed(sock)


def test_a_body_that_does_not_arrive_in_time_is_answered_with_connection_close(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path, env={"CE_HTTP_BODY_TIMEOUT": "1"}) as strict, _connect(strict) as sock:
        sock.sendall(_post_head(strict.token(uuid.uuid4()), len(BODY)))  # and never the body
        status, headers, _ = _read_answer(sock)
        assert status == 403 and headers["connection"] == "close"
        assert _closed(sock)


def test_writes_that_read_their_body_keep_the_connection(server: LiveServer) -> None:
    writer = server.token(uuid.uuid4(), scopes=["images:write"])
    with _connect(server) as sock:
        for _ in range(3):  # an invalid body is read, then answered 400, on one connection
            sock.sendall(_post_head(writer, len(BODY)) + BODY)
            status, headers, _ = _read_answer(sock)
            assert status == 400 and headers.get("connection") != "close"
