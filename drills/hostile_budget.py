"""The hostile drill's connection-budget phases, and where its processes waited for the CPU.

A worker with a small budget (``CE_HTTP_MAX_CONNECTIONS``) and a header timeout longer than the phase, so
that the timeout is not what frees a slot:

* full of idle keep-alive connections (each answered once, then silent): new clients, one after another,
  must be answered, idle connections closing to make room;
* full of busy connections (request heads trickling in, a byte a second): new clients must be refused fast
  (503 with Retry-After), and a keep-alive client the worker already holds keeps being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from .common import percentile

NEWCOMERS = 20
_LAST_DATA_RECV = 8 + 11 * 4  # struct tcp_info: tcpi_last_data_recv, ms


def run_queue_waits(pid: int) -> dict[int, float]:
    """Seconds each thread of ``pid`` has spent runnable but not running (``/proc/…/schedstat``)."""
    waits = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                waits[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
    return waits


def worker_pids(server_pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text()
        return [int(pid) for pid in children.split()]
    return []


class CpuWaits:
    """How long the server's workers and this process waited for a CPU over a phase (the most any one
    thread did): on a loaded machine, what separates the server's lateness from the client's."""

    def __init__(self, server_pid: int) -> None:
        self.pids = [*worker_pids(server_pid)]
        self.before = {pid: run_queue_waits(pid) for pid in [*self.pids, os.getpid()]}

    def figures(self) -> dict[str, float]:
        def most(pid: int) -> float:
            after = run_queue_waits(pid)
            return max((after[t] - self.before[pid].get(t, 0.0) for t in after), default=0.0)

        return {
            "server worker waited for CPU s": round(max((most(pid) for pid in self.pids), default=0.0), 2),
            "drill client waited for CPU s": round(most(os.getpid()), 2),
        }


def kernel_received(writer: Any) -> float:
    """When (``time.monotonic``) data last arrived on this socket, by the kernel's record (TCP_INFO)."""
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return time.monotonic() - struct.unpack_from("I", raw, _LAST_DATA_RECV)[0] / 1000


async def _exchange(reader: Any, writer: Any, request: bytes) -> tuple[int, bytes]:
    if request:
        writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), head


async def _newcomers(host: str, port: int, request: bytes, count: int = NEWCOMERS) -> dict[str, Any]:
    """``count`` new connections, one after another, each sending one request: its status and the time
    from connect to the answer's head (or to the connection ending unanswered)."""
    statuses: dict[str, int] = {}
    times, retry_after = [], set()
    for _ in range(count):
        began = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            status, head = await asyncio.wait_for(_exchange(reader, writer, request), 30)
            writer.close()
            key = str(status)
            if b"retry-after:" in head.lower():
                value = head.lower().split(b"retry-after:", 1)[1].split(b"\r\n", 1)[0]
                retry_after.add(value.strip().decode())
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            key = exc.__class__.__name__
        times.append(time.monotonic() - began)
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "new connections": statuses,
        "time to answer p50 s": round(percentile(times, 0.5), 3),
        "time to answer max s": round(max(times), 3),
        "Retry-After": sorted(retry_after),
    }


def _get(path: str, token: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: drill\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


async def full_of_idle(
    host: str, port: int, budget: int, token: str, newcomers: int = NEWCOMERS
) -> dict[str, Any]:
    """Fill the budget with keep-alive connections that were answered once and went silent, then let
    new clients connect."""
    gate = asyncio.Semaphore(256)
    request = _get("/healthz", token)

    async def one() -> tuple[Any, Any] | None:
        async with gate:
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                await asyncio.wait_for(_exchange(reader, writer, request), 10)
                return reader, writer
        return None

    held = [conn for conn in await asyncio.gather(*(one() for _ in range(budget))) if conn]
    await asyncio.sleep(1.5)  # all of them idle longer than the guard's minimum
    figures = {"idle keep-alive held": len(held), **await _newcomers(host, port, request, newcomers)}
    figures["idle ones closed by the server"] = sum(1 for reader, _ in held if reader.at_eof())
    for _, writer in held:
        writer.close()
    return figures


async def full_of_busy(
    host: str, port: int, budget: int, token: str, newcomers: int = NEWCOMERS
) -> dict[str, Any]:
    """Fill the budget with a polite keep-alive connection and request heads trickling in, then let new
    clients connect while the polite one keeps asking."""
    polite_reader, polite_writer = await asyncio.open_connection(host, port)
    request = _get("/v1/images?idc=us-west-1", token)
    await _exchange(polite_reader, polite_writer, request)
    gate = asyncio.Semaphore(256)
    head = b"GET /v1/images HTTP/1.1\r\nHost: drill\r\nX-Slow: " + b"a" * 1000
    stop = asyncio.Event()
    sending = 0  # tricklers connected with their first byte sent (or given up)
    all_sending = asyncio.Event()

    def one_more() -> None:
        nonlocal sending
        sending += 1
        if sending == budget - 1:
            all_sending.set()

    async def trickler() -> None:
        async with gate:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            except (OSError, TimeoutError):
                one_more()
                return
        with contextlib.suppress(OSError):
            for index, byte in enumerate(head):
                writer.write(bytes([byte]))
                await writer.drain()
                if index == 0:
                    one_more()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1)
                if stop.is_set():
                    break
        writer.close()

    polite: dict[str, int] = {}
    gaps: list[float] = []  # a failed request's silence before it, as the server saw it

    async def keep_asking() -> None:
        while not stop.is_set():
            gap = time.monotonic() - kernel_received(polite_writer)
            try:
                polite_writer.write(request)
                status, _ = await asyncio.wait_for(_exchange(polite_reader, polite_writer, b""), 10)
                key = str(status)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                key = exc.__class__.__name__
                gaps.append(round(gap, 2))
            polite[key] = polite.get(key, 0) + 1
            if key != "200":
                return
            await asyncio.sleep(0.1)

    tricklers = [asyncio.create_task(trickler()) for _ in range(budget - 1)]
    asking = asyncio.create_task(keep_asking())
    await all_sending.wait()  # the budget is full: polite + tricklers, every one with bytes sent
    figures = await _newcomers(host, port, _get("/healthz", token), newcomers)
    stop.set()
    await asyncio.gather(asking, *tricklers)
    polite_writer.close()
    figures["held keep-alive client meanwhile"] = polite
    figures["held client's silence before a failure s"] = gaps
    return figures
