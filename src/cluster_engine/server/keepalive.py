"""Answers that did not read the request body still leave a reusable connection, or say ``Connection: close``.

Many answers come before the handler reads the body: 401 and 403 (checked from the headers), 429, 404/405
from routing. Granian (hyper) then drops the unread body: if the body's bytes are not already in its buffer
at that moment it gives up on the connection and closes it after the answer, and that decision can come
after the answer's head was written without ``Connection: close``. The client then puts the connection
back in its pool as reusable, and its next request on it meets the server's close: ``Server disconnected
without sending a response``. A client sends the head and the body of a request in two writes, so on a
busy machine the body often arrives after the head was answered.

``KeepAliveGuard`` therefore reads the rest of an unread body itself, just before the answer starts:
at most ``DRAIN_LIMIT`` bytes, and only until the body deadline (``CE_HTTP_BODY_TIMEOUT`` from the
request's arrival). Drained, the connection carries the client's next request; not drained (too large,
too slow, ``Expect: 100-continue``, or the handler still reading), the answer says ``Connection: close``,
so no client reuses a connection the server is about to close. GET and HEAD pass through untouched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
DRAIN_LIMIT = 1024 * 1024  # the largest body the API accepts: a bigger one is not read for nothing
_WITHOUT_BODY = frozenset(("GET", "HEAD"))
_CLOSE = (b"connection", b"close")


class KeepAliveGuard:
    def __init__(self, app: Any, body_timeout: float) -> None:
        self.app, self.body_timeout = app, body_timeout

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in _WITHOUT_BODY:
            await self.app(scope, receive, send)
            return
        declared, expect_continue = _body_headers(scope["headers"])
        if declared == 0:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout
        done = False  # the whole body (or the disconnect) has been received
        reading = False  # the application is inside receive()

        async def tracked_receive() -> Any:
            nonlocal done, reading
            reading = True
            try:
                message = await receive()
            finally:
                reading = False
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        async def drain() -> bool:
            """Read and drop the rest of the body; True when all of it was read in time."""
            if reading or expect_continue or (declared is not None and declared > DRAIN_LIMIT):
                return False
            size = 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    async with asyncio.timeout(remaining):
                        message = await receive()
                except TimeoutError:
                    return False
                if message["type"] != "http.request":
                    return False  # the client went away
                size += len(message.get("body", b""))
                if size > DRAIN_LIMIT:
                    return False
                if not message.get("more_body", False):
                    return True

        async def guarded_send(message: Any) -> None:
            nonlocal done
            if message["type"] == "http.response.start" and not done:
                drained = await drain()
                done = True
                headers = list(message.get("headers", ()))
                if not drained and not any(_is_close(name, value) for name, value in headers):
                    message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        await self.app(scope, tracked_receive, guarded_send)


def _body_headers(headers: Any) -> tuple[int | None, bool]:
    """The declared body length (None when chunked or unknown, 0 when there is no body) and whether the
    client waits for ``100 Continue`` before sending it."""
    declared: int | None = 0
    expect_continue = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            declared = int(value) if value.strip().isdigit() else None
        elif lowered == b"transfer-encoding":
            declared = None
        elif lowered == b"expect":
            expect_continue = value.strip().lower() == b"100-continue"
    return declared, expect_continue


def _is_close(name: bytes, value: bytes) -> bool:
    return name.lower() == b"connection" and b"close" in value.lower()
