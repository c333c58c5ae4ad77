"""An ASGI application served over Granian's RSGI interface: what the RSGI read path (rsgi.py) does not
answer itself goes through here into the whole ASGI service (``create_app``), unchanged.

No maintained library does this (``rsgiadapter`` is one person's small project, not a dependency to take on
for the request path), and it is small. It gives the ASGI application what Granian's own ASGI interface
gives it (granian 2.8: ``src/asgi/utils.rs``, ``src/asgi/io.rs``):

- the scope: the same keys and values (``path`` percent-decoded, ``query_string`` as bytes, ``server`` and
  ``client`` as (host, port string), a ``host`` header added when the request has none, ``root_path`` "")
  except ``raw_path``, which RSGI does not expose (nothing in this service needs it), and header values
  that are not visible ASCII, which RSGI's headers leave out (an Authorization header of such bytes is
  given as ``UNREADABLE_AUTHORIZATION``, so that it is refused as an invalid token, not taken for none);
- ``receive``: the body chunk by chunk (``protocol.__aiter__``, never ``protocol()``, which would read a
  body of any size), each ``more_body=True``, then an empty last one, as Granian's ASGI does; a body that
  ends before its ``Content-Length`` is the client going away (``http.disconnect``). Once the body is in,
  ``receive`` waits for the answer to be sent or the client to disconnect, then says ``http.disconnect``.
  A read that a timeout cancelled (BodyDeadline, KeepAliveGuard) stays under way and the next ``receive``
  takes its result: RSGI's body iterator must not be asked again while a read is pending;
- ``send``: one body message is ``protocol.response_bytes``; a body in several messages
  (``more_body``) is ``protocol.response_stream`` and one ``send_bytes`` per message;
- lifespan (``Lifespan``): the application's startup runs in ``__rsgi_init__`` (Granian calls it in the
  worker, with the worker's event loop not yet running, before the worker serves) and its shutdown in
  ``__rsgi_del__`` (after the worker stopped serving), as Granian's ASGI interface runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

Message = dict[str, Any]
_ASGI = {"version": "3.0", "spec_version": "2.3"}
# An Authorization header RSGI does not show (its value is not visible ASCII) stands for a credential
# that cannot be read: a bearer token the verifier refuses as invalid, as it refuses such bytes over ASGI.
UNREADABLE_AUTHORIZATION = b"Bearer \x80"


def _address(text: str) -> tuple[str, str]:
    """RSGI's ``host:port`` (``[v6]:port``) as ASGI's (host, port) — a string port, as Granian's ASGI."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), port


def asgi_scope(scope: Any, state: dict[str, Any]) -> Message:
    """The ASGI ``http`` scope of an RSGI request."""
    shown = scope.headers
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in shown.items()]
    if "host" not in shown:
        headers.insert(0, (b"host", (scope.authority or "").encode("latin-1")))
    if "authorization" in shown and not shown.get_all("authorization"):
        headers.append((b"authorization", UNREADABLE_AUTHORIZATION))
    return {
        "type": "http",
        "asgi": _ASGI,
        "http_version": scope.http_version,
        "server": _address(scope.server),
        "client": _address(scope.client),
        "scheme": scope.scheme,
        "method": scope.method,
        "root_path": "",
        "path": scope.path,
        "query_string": scope.query_string.encode(),
        "headers": headers,
        "extensions": {},
        "state": state.copy(),
    }


def _declared_length(scope: Any) -> int | None:
    value = scope.headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


async def _next_chunk(chunks: Any) -> bytes | None:
    """The next piece of the body, b"" at its end, None when the client went away."""
    try:
        chunk: bytes = await chunks.__anext__()
    except StopAsyncIteration:
        return b""
    except RuntimeError:  # RSGIProtocolError / RSGIProtocolClosed
        return None
    return chunk


class Exchange:
    """One request's ``receive`` and ``send`` over its RSGI protocol object."""

    __slots__ = (
        "answered",
        "body_done",
        "chunks",
        "declared",
        "pending",
        "protocol",
        "received",
        "start",
        "stream",
    )

    def __init__(self, protocol: Any, declared: int | None) -> None:
        self.protocol, self.declared = protocol, declared
        self.received = 0
        self.chunks: Any = None
        self.pending: asyncio.Future[bytes | None] | None = None
        self.body_done = False
        self.answered = asyncio.Event()
        self.start: tuple[int, list[tuple[str, str]]] | None = None
        self.stream: Any = None

    async def receive(self) -> Message:
        if self.body_done:
            await self._until_disconnect()
            return {"type": "http.disconnect"}
        if self.pending is None:
            if self.chunks is None:
                self.chunks = self.protocol.__aiter__()
            self.pending = asyncio.ensure_future(_next_chunk(self.chunks))
        chunk = await asyncio.shield(self.pending)  # cancelled here, the read goes on for the next call
        self.pending = None
        if chunk:
            self.received += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": True}
        self.body_done = True
        if chunk is None or (self.declared is not None and self.received < self.declared):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def _until_disconnect(self) -> None:
        if self.answered.is_set():
            return
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self.answered.wait()),
            asyncio.ensure_future(_awaited(self.protocol.client_disconnect())),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = [
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in message["headers"]
            ]
            self.start = (message["status"], headers)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unsupported ASGI message over the RSGI bridge: {kind}")
        if self.answered.is_set():
            raise RuntimeError("the response was already sent")
        body, more = message.get("body", b""), message.get("more_body", False)
        if self.stream is None:
            if self.start is None:
                raise RuntimeError("http.response.body before http.response.start")
            status, headers = self.start
            if not more:
                self.protocol.response_bytes(status, headers, body)
                self.answered.set()
                return
            self.stream = self.protocol.response_stream(status, headers)
        if body:
            await self.stream.send_bytes(body)
        if not more:
            self.stream = None  # dropping the transport ends the body
            self.answered.set()

    def close(self) -> None:
        """After the application returned: end a streamed body it left open, stop a pending read."""
        self.stream = None
        self.answered.set()
        if self.pending is not None:
            self.pending.cancel()


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class Bridge:
    """RSGI → ASGI for ``app``; ``state`` is the lifespan state every request's scope gets a copy of."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}

    async def __call__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":  # websockets: the service has none (Starlette refuses them under ASGI)
            protocol.close(403)
            return
        exchange = Exchange(protocol, _declared_length(scope))
        try:
            await self.app(asgi_scope(scope, self.state), exchange.receive, exchange.send)
        finally:
            exchange.close()


class Lifespan:
    """The ASGI lifespan protocol of ``app``, driven from ``__rsgi_init__`` and ``__rsgi_del__``."""

    def __init__(self, app: Any, state: dict[str, Any]) -> None:
        self.app, self.state = app, state
        self._inbox: asyncio.Queue[Message] | None = None
        self._outbox: asyncio.Queue[Message] | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        assert self._inbox is not None and self._outbox is not None
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._outbox.put)
        except BaseException as exc:
            self._outbox.put_nowait({"type": "lifespan.errored", "message": repr(exc)})
            raise

    async def startup(self) -> None:
        """Run the application's startup; raises RuntimeError when it fails (the worker must not serve)."""
        self._inbox, self._outbox = asyncio.Queue(), asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="asgi-lifespan")
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._outbox.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"ASGI lifespan startup failed: {reply.get('message', '')}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        assert self._inbox is not None and self._outbox is not None
        await self._inbox.put({"type": "lifespan.shutdown"})
        reply = await self._outbox.get()
        with contextlib.suppress(Exception):
            await self._task
        if reply["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"ASGI lifespan shutdown failed: {reply.get('message', '')}")
