"""Hostile connections against a real server: every connection has a deadline from accept (silent, partial
head, idle keep-alive), request bodies have a deadline, and none of it holds other clients' requests.

Counts are bounded (a few hundred sockets); the 5,000-connection figures are in drills/hostile.py. The waits
below are liveness bounds far above the configured timeouts (a connection that is never closed fails them),
not performance checks.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_engine.testing import LiveServer

SILENT, PARTIAL = 200, 50
BOUND = 30.0  # seconds: far above every timeout configured below


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[LiveServer]:
    env = {"CE_HTTP_HEADER_TIMEOUT": "1", "CE_HTTP_BODY_TIMEOUT": "1", "CE_ACCESS_LOG": "false"}
    with LiveServer.start(tmp_path, env=env, args=["--demo"]) as server:
        yield server


def _address(server: LiveServer) -> tuple[str, int]:
    return "127.0.0.1", int(server.url.rsplit(":", 1)[1])


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection."""
    data = b""
    async with asyncio.timeout(BOUND):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def _request(server: LiveServer, org: uuid.UUID, path: str = "/v1/images") -> int:
    host, port = _address(server)
    reader, writer = await asyncio.open_connection(host, port)
    token = server.token(org)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    response = await _closed_by_server(reader)
    writer.close()
    return int(response.split(b" ", 2)[1])


def test_silent_and_partial_connections_are_closed_and_do_not_block(
    strict: LiveServer, demo_org: uuid.UUID
) -> None:
    async def scenario() -> None:
        host, port = _address(strict)
        silent = [await asyncio.open_connection(host, port) for _ in range(SILENT)]
        partial = [await asyncio.open_connection(host, port) for _ in range(PARTIAL)]
        for _, writer in partial:
            writer.write(b"GET /v1/images HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        assert await _request(strict, demo_org) == 200  # answered while all of them are held
        sent = await asyncio.gather(*(_closed_by_server(reader) for reader, _ in silent + partial))
        assert all(not data or data.startswith(b"HTTP/1.1 408") for data in sent)
        for _, writer in silent + partial:
            writer.close()

    asyncio.run(scenario())


def test_idle_keep_alive_connection_is_closed(strict: LiveServer) -> None:
    async def scenario() -> bytes:
        reader, writer = await asyncio.open_connection(*_address(strict))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await _closed_by_server(reader)  # answered, then closed once idle past the timeout
        writer.close()
        return data

    data = asyncio.run(scenario())
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1


def test_slow_body_is_cut_off_with_408_and_holds_nothing_else(
    strict: LiveServer, demo_org: uuid.UUID
) -> None:
    async def scenario() -> tuple[bytes, int]:
        reader, writer = await asyncio.open_connection(*_address(strict))
        token = strict.token(demo_org, scopes=["images:write"])
        writer.write(
            f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1024\r\n\r\n{{".encode()
        )

        async def trickle() -> None:
            for _ in range(1023):
                await asyncio.sleep(0.2)
                writer.write(b" ")
                await writer.drain()

        trickling = asyncio.create_task(trickle())
        other = await _request(strict, demo_org)  # served while the slow body is being sent
        answer = await _closed_by_server(reader)
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)
        writer.close()
        return answer, other

    answer, other = asyncio.run(scenario())
    assert other == 200
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"CE_HTTP_BODY_TIMEOUT" in answer


def test_full_connection_budget_keeps_serving_held_connections(tmp_path: Path, demo_org: uuid.UUID) -> None:
    """At CE_HTTP_MAX_CONNECTIONS, a connection the worker already holds is still answered."""
    env = {"CE_HTTP_MAX_CONNECTIONS": "16", "CE_HTTP_HEADER_TIMEOUT": "30", "CE_ACCESS_LOG": "false"}
    with LiveServer.start(tmp_path, env=env, args=["--demo"]) as server:

        async def scenario() -> list[int]:
            (reader, writer), *idle = await _connections(server, 16)  # the budget is now full
            token = server.token(demo_org)
            statuses = []
            for _ in range(20):
                writer.write(
                    f"GET /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                statuses.append(int(head.split(b" ", 2)[1]))
            for _, idle_writer in [*idle, (reader, writer)]:
                idle_writer.close()
            return statuses

        assert asyncio.run(scenario()) == [200] * 20


async def _connections(
    server: LiveServer, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections to ``server``, opened one after the other."""
    host, port = _address(server)
    return [await asyncio.open_connection(host, port) for _ in range(count)]


def _head(token: str, path: str = "/v1/images") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


async def _answer(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(BOUND):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
    return head


@pytest.fixture
def small_budget(tmp_path: Path) -> Iterator[LiveServer]:
    """16 connections per worker and a header timeout longer than BOUND: within these tests, the timeout
    is never what frees a slot."""
    env = {"CE_HTTP_MAX_CONNECTIONS": "16", "CE_HTTP_HEADER_TIMEOUT": "60", "CE_ACCESS_LOG": "false"}
    with LiveServer.start(tmp_path, env=env, args=["--demo"]) as server:
        yield server


def test_full_budget_of_idle_keep_alive_connections_makes_room_for_a_new_one(
    small_budget: LiveServer, demo_org: uuid.UUID
) -> None:
    async def scenario() -> tuple[bytes, int]:
        token = small_budget.token(demo_org)
        held = await _connections(small_budget, 16)
        for reader, writer in held:  # each answered once, then silent: the budget is full of idle ones
            writer.write(_head(token, "/healthz"))
            await _answer(reader)
        ((reader, writer),) = await _connections(small_budget, 1)
        writer.write(_head(token))
        head = await _answer(reader)  # the worker closes an idle connection to take this one
        writer.close()
        for _, idle_writer in held:
            idle_writer.close()
        return head, sum(1 for idle_reader, _ in held if idle_reader.at_eof())

    head, closed = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 200")
    assert closed >= 1


def test_full_budget_of_busy_connections_refuses_a_new_one_and_keeps_answering(
    small_budget: LiveServer, demo_org: uuid.UUID
) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        request = _head(small_budget.token(demo_org))
        held = await _connections(small_budget, 16)
        for _, writer in held:  # every one has a request under way (its head half sent): none is idle
            writer.write(request[:20])
        ((reader, writer),) = await _connections(small_budget, 1)
        writer.write(request)
        refusal = await _closed_by_server(reader)  # refused at once, not queued until a slot frees
        writer.close()
        held_reader, held_writer = held[0]
        held_writer.write(request[20:])
        answer = await _answer(held_reader)  # a connection the worker holds is still answered
        for _, busy_writer in held:
            busy_writer.close()
        return refusal, answer

    refusal, answer = asyncio.run(scenario())
    assert refusal.startswith(b"HTTP/1.1 503"), refusal[:200]
    assert b"retry-after: 1" in refusal.lower()
    assert answer.startswith(b"HTTP/1.1 200")
