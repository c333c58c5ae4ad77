"""A stand-in for a Starlette request with a body, for calling a body reader without a server."""

from __future__ import annotations

from collections.abc import AsyncIterator


class BodyRequest:
    """What a body reader reads of a request: its ``content-length`` header and its body stream, which
    yields ``body`` in one chunk."""

    def __init__(self, body: bytes) -> None:
        self.headers = {"content-length": str(len(body))}
        self._body = body

    async def stream(self) -> AsyncIterator[bytes]:
        yield self._body
