"""In-process cost of one request through the whole ASGI stack (no server, no sockets): microseconds of
CPU per request for the hot endpoints, to compare code changes without a load generator. The machine's
noise affects it far less than an HTTP benchmark, since it measures process CPU time.

    ./dev run python -m bench micro [--requests 50000] [--rounds 1] [--cors]

With --cors, CORS is on (CE_CORS_ORIGINS) and every request carries an allowed Origin, as a browser's do.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .catalog import org_id, write_catalog

SPREAD_ORGS = 2500  # tokens rotated through by the "spread" case


CORS_ORIGIN = "http://localhost:5173"


def prepare(cors: bool) -> tuple[Any, str, Any]:
    """A migrated SQLite catalog of the benchmark's N=1000 images; its settings, secret and description."""
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ce-micro-metrics-"))
    from cluster_engine.server.config import load_settings

    workdir = Path(tempfile.mkdtemp(prefix="ce-micro-"))
    info = write_catalog(1000, workdir / "catalog.json")
    secret = secrets.token_urlsafe(48)
    env = {"CE_DATA_DIR": str(workdir), "CE_JWT_SECRET": secret}
    settings = load_settings({**env, "CE_CORS_ORIGINS": CORS_ORIGIN if cors else ""})
    for command in (["db", "upgrade"], ["catalog", "import", str(info.path)]):
        subprocess.run(
            [sys.executable, "-m", "cluster_engine", *command],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
    return settings, secret, info


async def measure(settings: Any, secret: str, info: Any, requests: int, rounds: int = 1) -> None:
    origin = [(b"origin", CORS_ORIGIN.encode())] if settings.cors_origins else []
    from cluster_engine.server.app import create_app
    from cluster_engine.server.auth import mint_token

    sys.stderr = io.StringIO()  # the access log goes to a string, as it would go to a pipe
    app = create_app(settings)
    token = mint_token(secret, uuid.UUID(str(info.org)))
    startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def lifespan_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, startup.get, lifespan_send)
    )
    await started.wait()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    def scope(
        path: str, query: bytes, extra: list[tuple[bytes, bytes]] = (), bearer: str | None = None
    ) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [
                (b"host", b"127.0.0.1:8080"),
                (b"authorization", f"Bearer {bearer or token}".encode()),
                *origin,
                *extra,
            ],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8080),
        }

    filtered = f"idc={info.idc}&product={info.product}".encode()
    cases = {
        "filtered": scope("/v1/images", filtered),
        "unfiltered": scope("/v1/images", b""),
        "get": scope(f"/v1/images/{info.public_id}", b""),
        "api-filter": scope("/api/v1/images", filtered),  # the same answer under the contract's /api
    }
    # the 304 case needs the ETag of the filtered answer
    headers: list[tuple[bytes, bytes]] = []

    async def capture(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers.extend(message["headers"])

    await app(cases["filtered"], receive, capture)
    etag = dict(headers)[b"etag"]
    cases["304"] = scope("/v1/images", filtered, [(b"if-none-match", etag)])
    # the filtered list with a different org's token on every request (the benchmark's orgs first, then
    # orgs without Customized images), as traffic from many consoles arrives
    spread = [scope("/v1/images", filtered, bearer=mint_token(secret, org_id(n))) for n in range(SPREAD_ORGS)]
    runs: dict[str, list[dict[str, Any]]] = {name: [case] for name, case in cases.items()}
    runs["spread"] = spread
    for name, rotation in runs.items():
        for n in range(max(1000, len(rotation))):
            await app(dict(rotation[n % len(rotation)]), receive, send)
        sent.clear()
        best = float("inf")
        for _ in range(rounds):  # the fastest round: the least disturbed by the machine's other work
            began = time.process_time()
            for n in range(requests):
                await app(dict(rotation[n % len(rotation)]), receive, send)
            best = min(best, time.process_time() - began)
        statuses = set(sent)
        print(f"{name:<11} {best / requests * 1e6:7.2f} µs/request  statuses={sorted(statuses)}")
    lifespan.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=1, help="measure each case this often, print the best")
    parser.add_argument("--cors", action="store_true", help=f"CORS on, requests from {CORS_ORIGIN}")
    arguments = parser.parse_args(argv)
    asyncio.run(measure(*prepare(arguments.cors), requests=arguments.requests, rounds=arguments.rounds))
    return 0
