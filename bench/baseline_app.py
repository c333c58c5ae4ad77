"""The benchmark's floor: a raw ASGI app that answers each scenario with precomputed bytes.

It is served by the same server as the service (Granian, ASGI interface, one worker, uvloop when installed,
access log off), so ``service ÷ baseline`` measures what the service's own request handling costs on top
of the server. Per request it does only what any handler must: a dict lookup on (path, query string), a
scan of the request headers for ``If-None-Match``, and the two ``send`` calls.

The responses file (``--responses``, or ``BENCH_BASELINE_RESPONSES`` in the worker) is a JSON list of
``{"path", "query", "status", "headers": [[name, value], …], "body_b64", "etag", "headers_304"}`` written by
``bench/nginx.py`` (``python -m bench run``) from the real service's answers.

    python bench/baseline_app.py --port 8081 --responses responses.json
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

ENV = "BENCH_BASELINE_RESPONSES"
NOT_FOUND = (404, [(b"content-type", b"text/plain"), (b"content-length", b"9")], b"not found")


def _headers(pairs: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def create_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Granian's factory target: build the app from the responses file named in the environment."""
    spec = json.loads(Path(os.environ[ENV]).read_text(encoding="utf-8"))
    routes: dict[tuple[str, bytes], tuple[int, list[tuple[bytes, bytes]], bytes, bytes | None, Any]] = {}
    for item in spec:
        etag = item["etag"].encode("latin-1") if item.get("etag") else None
        headers_304 = _headers(item["headers_304"]) if item.get("headers_304") is not None else None
        routes[(item["path"], item["query"].encode("latin-1"))] = (
            item["status"],
            _headers(item["headers"]),
            base64.b64decode(item["body_b64"]),
            etag,
            headers_304,
        )

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
            status, headers, body = NOT_FOUND
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


def main() -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--responses", type=Path, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    os.environ[ENV] = str(args.responses.resolve())
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    # Mirrors `cluster-engine serve` (cli/server.py): the same interface, loop, worker count and logging.
    Granian(
        "baseline_app:create_app",
        factory=True,
        address="127.0.0.1",
        port=args.port,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop if has_uvloop else Loops.asyncio,
        workers=1,
        log_level=LogLevels(args.log_level),
        log_access=False,
        working_dir=Path(__file__).resolve().parent,
    ).serve()


if __name__ == "__main__":
    main()
