"""The benchmark's floors: a raw app that answers each scenario with precomputed bytes, over ASGI or RSGI.

It is served by the same server as the service, with the same setup (Granian, one worker, uvloop when
installed, access log off, HTTP/1 only with the service's backlog, connection limit and HTTP/1 settings),
so ``service ÷ baseline`` measures what the service's own request handling costs on top of the server.
The two interfaces share one responses file and one rule; only the calling convention differs:

- ``create_app`` (ASGI): a dict lookup on (path, query string), a scan of the request headers for
  ``If-None-Match``, and the two ``send`` calls;
- ``create_rsgi_app`` (RSGI): the same lookup on granian's ``str`` path and query, ``scope.headers.get``
  for ``If-None-Match``, and one ``protocol.response_bytes`` call.

The responses file (``--responses``, or ``BENCH_BASELINE_RESPONSES`` in the worker) is a JSON list of
``{"path", "query", "status", "headers": [[name, value], …], "body_b64", "etag", "headers_304"}`` written by
``bench/nginx.py`` (``python -m bench run``) from the real service's answers.

    python bench/baseline_app.py --port 8081 --responses responses.json [--interface asgi|rsgi]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib.util
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
StrHeaders = list[tuple[str, str]]
ByteHeaders = list[tuple[bytes, bytes]]

ENV = "BENCH_BASELINE_RESPONSES"
FACTORIES = {"asgi": "create_app", "rsgi": "create_rsgi_app"}
NOT_FOUND: tuple[int, StrHeaders, bytes] = (
    404,
    [("content-type", "text/plain"), ("content-length", "9")],
    b"not found",
)


@dataclasses.dataclass(frozen=True)
class Route:
    """One precomputed answer: 200 with ``headers`` and ``body``, or 304 with ``headers_304`` when the
    request's ``If-None-Match`` equals ``etag`` (``etag`` is None when the route has no 304)."""

    path: str
    query: str
    status: int
    headers: StrHeaders
    body: bytes
    etag: str | None
    headers_304: StrHeaders | None


def load_routes(path: Path) -> list[Route]:
    """The routes of a responses file (header names lower-cased, as both interfaces deliver them)."""

    def pairs(items: list[list[str]]) -> StrHeaders:
        return [(name.lower(), value) for name, value in items]

    routes = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        has_304 = bool(item.get("etag")) and item.get("headers_304") is not None
        routes.append(
            Route(
                path=item["path"],
                query=item["query"],
                status=item["status"],
                headers=pairs(item["headers"]),
                body=base64.b64decode(item["body_b64"]),
                etag=item["etag"] if has_304 else None,
                headers_304=pairs(item["headers_304"]) if has_304 else None,
            )
        )
    return routes


def _latin1(headers: StrHeaders) -> ByteHeaders:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def create_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Granian's ASGI factory target: build the app from the responses file named in the environment."""
    routes: dict[tuple[str, bytes], tuple[int, ByteHeaders, bytes, bytes | None, ByteHeaders | None]] = {
        (r.path, r.query.encode("latin-1")): (
            r.status,
            _latin1(r.headers),
            r.body,
            r.etag.encode("latin-1") if r.etag is not None else None,
            _latin1(r.headers_304) if r.headers_304 is not None else None,
        )
        for r in load_routes(Path(os.environ[ENV]))
    }
    not_found = (NOT_FOUND[0], _latin1(NOT_FOUND[1]), NOT_FOUND[2])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        route = routes.get((scope["path"], scope["query_string"]))
        if route is None:
            status, headers, body = not_found
        else:
            status, headers, body, etag, headers_304 = route
            if etag is not None and headers_304 is not None:
                for name, value in scope["headers"]:
                    if name == b"if-none-match":
                        if value == etag:
                            status, headers, body = 304, headers_304, b""
                        break
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def create_rsgi_app() -> Callable[[Any, Any], Awaitable[None]]:
    """Granian's RSGI factory target: the same routes and rule as ``create_app``, in granian's native
    calling convention (``str`` path, query and headers; the whole answer in one ``response_bytes``)."""
    routes: dict[tuple[str, str], tuple[int, StrHeaders, bytes, str | None, StrHeaders | None]] = {
        (r.path, r.query): (r.status, r.headers, r.body, r.etag, r.headers_304)
        for r in load_routes(Path(os.environ[ENV]))
    }

    async def app(scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return
        route = routes.get((scope.path, scope.query_string))
        if route is None:
            status, headers, body = NOT_FOUND
        else:
            status, headers, body, etag, headers_304 = route
            if etag is not None and headers_304 is not None and scope.headers.get("if-none-match") == etag:
                status, headers, body = 304, headers_304, b""
        protocol.response_bytes(status, headers, body)

    return app


def main() -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    from cluster_engine.server.config import load_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--responses", type=Path, required=True)
    parser.add_argument("--interface", choices=sorted(FACTORIES), default="asgi")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    os.environ[ENV] = str(args.responses.resolve())
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    settings = load_settings(os.environ)
    # Mirrors `cluster-engine serve` (cli/server.py): the same loop, worker count, logging, HTTP mode,
    # backlog, connection limit and HTTP/1 settings; only the interface may differ.
    Granian(
        f"baseline_app:{FACTORIES[args.interface]}",
        factory=True,
        address="127.0.0.1",
        port=args.port,
        interface=Interfaces.RSGI if args.interface == "rsgi" else Interfaces.ASGI,
        loop=Loops.uvloop if has_uvloop else Loops.asyncio,
        workers=1,
        log_level=LogLevels(args.log_level),
        log_access=False,
        http=HTTPModes.http1,
        backlog=settings.backlog,
        backpressure=settings.max_connections,
        http1_settings=HTTP1Settings(
            header_read_timeout=int(settings.header_timeout * 1000),
            max_buffer_size=settings.max_header_bytes,
        ),
        working_dir=Path(__file__).resolve().parent,
    ).serve()


if __name__ == "__main__":
    main()
