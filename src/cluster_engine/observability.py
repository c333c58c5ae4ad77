"""Request metrics (Prometheus), request ids and one access-log line per request.

``Observability`` is the outermost ASGI middleware, so it sees every request, the raw-ASGI read path
included. Per request it: takes or makes an ``X-Request-ID`` and echoes it, counts the request in flight,
and afterwards records count and latency by route template and status, and queues one access-log line
(JSON, or readable text on a terminal). Lines are written by a background flush rather than one write
per request, which keeps logging off the hot path; the token is never logged, only the caller's org.

Several worker processes share metrics through prometheus_client's multiprocess mode: ``serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, and ``/metrics`` then
aggregates every worker's values.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REQUEST_ID = b"x-request-id"
ORG_KEY = "cluster_engine.org"  # set in the ASGI scope by whoever authenticated the caller
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def route_of(path: str) -> str:
    """The route template of a path: bounded label values whatever clients send."""
    if path == "/v1/images":
        return path
    if path.startswith("/v1/images/") and "/" not in path[11:]:
        return "/v1/images/{id}"
    if path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/openapi.yaml", "/docs"):
        return path
    if path.startswith("/docs/assets/"):
        return "/docs/assets/{asset}"
    return "other"


class Metrics:
    """Every metric the service exports, in one registry."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        registry = None if self.multiprocess else self.registry
        if self.multiprocess:
            prometheus_multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]

        def gauge(
            name: str, documentation: str, labels: tuple[str, ...] = (), mode: str = "livesum"
        ) -> Gauge:
            # prometheus_client's stubs declare multiprocess_mode as a Literal of the modes
            return Gauge(name, documentation, labels, registry=registry, multiprocess_mode=mode)  # type: ignore[arg-type]

        self.requests = Counter(
            "ce_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=registry
        )
        self.latency = Histogram(
            "ce_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = gauge("ce_http_requests_in_flight", "HTTP requests being answered")
        self.auth_failures = Counter(
            "ce_auth_failures", "Requests refused at authentication", ["reason"], registry=registry
        )
        self.catalog_images = gauge(
            "ce_catalog_images_held", "Images held in a worker's read model", ("type",), mode="liveall"
        )
        self.catalog_revision = gauge(
            "ce_catalog_revision", "Catalog revision a worker's read model reflects", mode="liveall"
        )
        self.catalog_age = gauge(
            "ce_catalog_age_seconds", "Seconds since a worker last confirmed its read model", mode="liveall"
        )
        self.db_errors = Counter(
            "ce_db_errors", "Database operations that failed", ["operation"], registry=registry
        )
        self.db_pool_checked_out = gauge(
            "ce_db_pool_connections_in_use",
            "Database connections checked out of a worker's pool",
            mode="liveall",
        )
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(route, method, str(status))
        counter.inc()
        histogram = self._histograms.get((route, method))
        if histogram is None:
            histogram = self._histograms[(route, method)] = self.latency.labels(route, method)
        histogram.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class AccessLog:
    """Buffers one line per request and writes them in batches from a background task."""

    def __init__(self, stream: TextIO | None = None, *, json_lines: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.json_lines = (not self.stream.isatty()) if json_lines is None else json_lines
        self._lines: list[str] = []
        self._encode = msgspec.json.Encoder().encode

    def record(self, fields: dict[str, Any]) -> None:
        if self.json_lines:
            self._lines.append(self._encode(fields).decode())
        else:
            self._lines.append(
                f"{fields['time']} {fields['status']} {fields['method']} {fields['path']} "
                f"{fields['durationMs']:.1f}ms org={fields.get('orgId') or '-'} id={fields['requestId']}"
            )
        if len(self._lines) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()

    async def flush_forever(self, interval: float = 0.2) -> None:
        try:
            while True:
                await asyncio.sleep(interval)
                self.flush()
        finally:
            self.flush()


class Observability:
    """Outermost ASGI middleware: request id, in-flight gauge, metrics and the access log."""

    def __init__(self, app: Any, metrics: Metrics, access_log: AccessLog | None) -> None:
        self.app, self.metrics, self.access_log = app, metrics, access_log
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time()):x}-"

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                if _REQUEST_ID_RE.fullmatch(value):
                    request_id = value
                break
        if request_id is None:
            request_id = (self._id_prefix + format(next(self._ids), "x")).encode()
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID, request_id)]
            await send(message)

        in_flight = self.metrics.in_flight
        in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            in_flight.dec()
            elapsed = time.perf_counter() - started
            path = scope["path"]
            method = scope["method"]
            self.metrics.observe(route_of(path), method, status, elapsed)
            if self.access_log is not None:
                self.access_log.record(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                        "requestId": request_id.decode(),
                        "method": method,
                        "path": path,
                        "route": route_of(path),
                        "status": status,
                        "durationMs": round(elapsed * 1000, 3),
                        "orgId": scope.get(ORG_KEY),
                    }
                )
