"""A deadline on request bodies (``CE_HTTP_BODY_TIMEOUT``): slow-body clients cannot hold a request open.

Granian (hyper) bounds the time to send a request head, not its body. ``BodyDeadline`` wraps ``receive`` for
requests that carry one (POST, PUT, PATCH): the whole body must have arrived within ``timeout`` seconds of
the request reaching the app, else the read raises ``RequestTimeout``, which renders as 408 with
``Connection: close`` (the rest of the body is never read, so the connection cannot carry another request).
Waiting is asynchronous: a slow body holds nothing but its own request. GET and the other methods are passed
through unwrapped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

from .errors import RequestTimeout

Scope = MutableMapping[str, Any]
_WITH_BODY = frozenset(("POST", "PUT", "PATCH"))


class BodyDeadline:
    def __init__(self, app: Any, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout
        done = False

        async def bounded_receive() -> Any:
            nonlocal done
            if done:  # the body is in: later reads wait for the disconnect, unbounded
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"request body not received within {self.timeout:g} s (CE_HTTP_BODY_TIMEOUT)"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        await self.app(scope, bounded_receive, send)
