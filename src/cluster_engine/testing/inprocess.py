"""The app of ``create_app`` in the calling process, for tests of the application's own rules (bodies,
statuses, headers, documents) that need no server process: no Granian, no sockets, no start-up wait.

``InProcess.start(settings)`` runs the ASGI lifespan (the store, the read model, the poller) on an event
loop in a thread of its own; ``.http`` is an ``httpx.Client`` whose requests that loop answers. Behaviour
of the server process (connections, timeouts, workers, signals) needs ``LiveServer``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ..server.app import create_app
from ..server.config import Settings

T = TypeVar("T")
STARTUP_TIMEOUT = 60.0


class _LoopTransport(httpx.BaseTransport):
    """Sends each request through ``httpx.ASGITransport`` on the app's loop and waits for the answer."""

    def __init__(self, runner: InProcess) -> None:
        self.runner = runner
        self.asgi = httpx.ASGITransport(app=runner.app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            request.stream = httpx.ByteStream(request.read())
            response = await self.asgi.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return self.runner.run(send())


class InProcess:
    """The app on a loop of its own; ``http`` sends to it. A context manager (``close`` shuts it down)."""

    url = "http://in-process"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process-app", daemon=True)
        self.to_app: asyncio.Queue[dict[str, Any]] | None = None
        self.from_app: asyncio.Queue[dict[str, Any]] | None = None
        self.lifespan: asyncio.Future[None] | None = None
        self.http = httpx.Client(transport=_LoopTransport(self), base_url=self.url, timeout=30)

    @classmethod
    def start(cls, settings: Settings) -> InProcess:
        runner = cls(settings)
        runner.thread.start()
        try:
            runner._lifespan("startup")
        except BaseException:
            runner.close()
            raise
        return runner

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the app's loop; its result."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(STARTUP_TIMEOUT)

    def _lifespan(self, phase: str) -> None:
        """Send ``lifespan.<phase>`` to the app (starting its lifespan call first) and wait for its answer."""

        async def step() -> dict[str, Any]:
            if self.lifespan is None:
                self.to_app, self.from_app = asyncio.Queue(), asyncio.Queue()
                scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
                self.lifespan = asyncio.ensure_future(self.app(scope, self.to_app.get, self.from_app.put))
            assert self.to_app is not None and self.from_app is not None
            await self.to_app.put({"type": f"lifespan.{phase}"})
            answer = await self.from_app.get()
            if phase == "shutdown":
                await self.lifespan
            return answer

        answer = self.run(step())
        if answer["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"lifespan {phase}: {answer}")

    def close(self) -> None:
        self.http.close()
        try:
            if self.lifespan is not None and not self.lifespan.done():  # started, still serving
                self._lifespan("shutdown")
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def __enter__(self) -> InProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
