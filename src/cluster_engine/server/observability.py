"""Request metrics (Prometheus), request ids and one access-log line per request.

``RequestBookkeeper`` does the bookkeeping for both ways in: ``HotPath`` (reads.py) calls it inline for
the two read endpoints, and ``BookkeepingMiddleware``, in front of Starlette, for every other request
that gets past ``HotPath``. (Answers given further out are not seen here: CORS preflights, and the rate
limiter's 429s, which have their own counter.) Per request it: takes or makes an ``X-Request-ID`` and
echoes it, counts the request in flight, and afterwards records count and latency by route template and
status, and queues one access-log line (JSON, or readable text on a terminal). Lines are written by a
background flush rather than one write per request, which keeps logging off the hot path; the token is
never logged, only the caller's org.

Several worker processes share metrics through prometheus_client's multiprocess mode: ``serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, and ``/metrics`` then
aggregates every worker's values.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import logging
import os
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, MutableMapping
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

from .pids import pid_alive

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REQUEST_ID = b"x-request-id"
ORG_KEY = "cluster_engine.org"  # set in the ASGI scope by whoever authenticated the caller
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
FLUSH_EVERY = 200  # access-log entries formatted and written at once (well under a millisecond)
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


async def flush_every(flush: Callable[[], None], interval: float) -> None:
    """Call ``flush`` every ``interval`` seconds, and once more when cancelled (at shutdown)."""
    try:
        while True:
            await asyncio.sleep(interval)
            flush()
    finally:
        flush()


class _MultiProcessCollector(prometheus_multiprocess.MultiProcessCollector):
    """prometheus_client's collector, skipping a file another worker has created but not yet sized
    (reading it would fail the whole scrape: prometheus/client_python#1199)."""

    def collect(self) -> Any:
        files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _sized(f)]
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]


def _sized(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8  # a used-size header of 4 bytes, then padding
    except OSError:
        return False  # removed since the glob


def _forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of workers that died without saying so (killed, then respawned), so that
    "live" sums count only workers that exist."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = path.rsplit("_", 1)[-1][: -len(".db")]
        if pid.isdigit() and not pid_alive(int(pid)):
            prometheus_multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


class _Pending:
    """Requests of one (route, method, status) seen since the last flush: count, latency sum, buckets."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last one is +Inf


class Metrics:
    """Every metric the service exports, in one registry.

    Request counts and latencies are tallied in plain Python per worker and written to the Prometheus
    metrics by ``flush`` (every half second, and before each scrape): one multiprocess-mode write costs
    about a microsecond under a lock, and a request would otherwise pay three.
    """

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # auto_describe would read every worker's files at registration, racing workers that are
        # creating theirs (prometheus/client_python#1199)
        self.registry = CollectorRegistry(auto_describe=not self.multiprocess)
        registry = None if self.multiprocess else self.registry
        if self.multiprocess:
            _forget_dead_workers(os.environ[MULTIPROC_ENV])
            _MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]

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
        self.in_flight = gauge(
            "ce_http_requests_in_flight", "HTTP requests being answered (sampled every second)"
        )
        self.throttled = Counter(
            "ce_http_throttled",
            "Requests answered 429 by the per-org rate limit (CE_RATE_LIMIT)",
            registry=registry,
        )
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
        self.catalog_polls = Counter(
            "ce_catalog_polls",
            "Change polls of a worker's read model, by what served them: database (it asked for the "
            "revision), fetched (the changes up to a revision another worker of the same serve read), "
            "shared (changes another worker fetched, from their revision board), board (confirmed by "
            "another worker's poll)",
            ["source"],
            registry=registry,
        )
        self.db_pool_checked_out = gauge(
            "ce_db_pool_connections_in_use",
            "Database connections checked out of a worker's pool",
            mode="liveall",
        )
        self._pending: dict[tuple[str, str, int], _Pending] = {}
        self._batched = _can_add_many(self.latency)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if not self._batched:  # pragma: no cover - only with a prometheus_client unlike ours
            self.requests.labels(route, method, str(status)).inc()
            self.latency.labels(route, method).observe(seconds)
            return
        pending = self._pending.get((route, method, status))
        if pending is None:
            pending = self._pending[(route, method, status)] = _Pending()
        pending.count += 1
        pending.total += seconds
        pending.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1

    def flush(self) -> None:
        """Write what ``observe`` tallied since the last flush to the Prometheus metrics."""
        pending, self._pending = self._pending, {}
        for (route, method, status), tally in pending.items():
            self.requests.labels(route, method, str(status)).inc(tally.count)
            histogram: Any = self.latency.labels(route, method)
            histogram._sum.inc(tally.total)
            for value, count in zip(histogram._buckets, tally.buckets, strict=True):
                if count:
                    value.inc(count)

    def exposition(self) -> tuple[bytes, str]:
        self.flush()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def flush_forever(self, interval: float = 0.5) -> None:
        await flush_every(self.flush, interval)


def _can_add_many(histogram: Histogram) -> bool:
    """prometheus_client has no public call that adds many observations at once. Its histogram children
    hold one ``_sum`` value and one ``_buckets`` value per bound (not cumulative), which is what
    ``observe`` increments; ``flush`` adds to those directly when they are there (test_operations checks
    the exposition), and a release that changed them makes ``observe`` write through instead."""
    child = histogram.labels("/v1/images", "GET")  # the busiest series: starting it at zero is harmless
    buckets = getattr(child, "_buckets", None)
    return (
        isinstance(buckets, list)
        and len(buckets) == len(_LATENCY_BUCKETS) + 1
        and all(hasattr(value, "inc") for value in [*buckets, getattr(child, "_sum", None)])
    )


class _Line(msgspec.Struct):
    """One access-log line in JSON form (``time``, ``level``, ``logger`` as logformat's lines)."""

    time: str
    level: str
    logger: str
    requestId: str
    method: str
    path: str
    route: str
    status: int
    durationMs: float
    orgId: str | None


_Entry = tuple[float, bytes, str, str, str, int, float, str | None]


class AccessLog:
    """Keeps one entry per request and writes them as lines in batches from a background task.

    Entries are kept raw and formatted at flush time, so a request only pays for appending a tuple.
    """

    def __init__(self, stream: TextIO | None = None, *, json_lines: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.json_lines = (not self.stream.isatty()) if json_lines is None else json_lines
        self._entries: list[_Entry] = []
        self._waiting = asyncio.Event()  # set when the first entry of a batch is recorded
        self._encode_lines = msgspec.json.Encoder().encode_lines
        self._second = -1
        self._stamp = ""

    def record(
        self,
        at: float,
        request_id: bytes,
        method: str,
        path: str,
        route: str,
        status: int,
        seconds: float,
        org: str | None,
    ) -> None:
        entries = self._entries
        if not entries:
            self._waiting.set()  # the flusher sleeps until there is something to write
        entries.append((at, request_id, method, path, route, status, seconds, org))
        if len(entries) >= FLUSH_EVERY:  # small batches: a big one would stall the event loop
            self.flush()

    def _time(self, at: float) -> str:
        second = int(at)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp + f".{int((at - second) * 1000):03d}Z"

    def _json(self, entries: list[_Entry]) -> str:
        lines = [
            _Line(
                self._time(at),
                "INFO",
                "access",
                rid.decode(),
                method,
                path,
                route,
                status,
                round(seconds * 1000, 3),
                org,
            )
            for at, rid, method, path, route, status, seconds, org in entries
        ]
        return self._encode_lines(lines).decode()

    def _text(self, entries: list[_Entry]) -> str:
        return "".join(
            f"{self._time(at)} INFO access: {status} {method} {path} {seconds * 1000:.1f}ms org={org or '-'} "
            f"id={rid.decode()}\n"
            for at, rid, method, path, _route, status, seconds, org in entries
        )

    def flush(self) -> None:
        if self._entries:
            entries, self._entries = self._entries, []
            with contextlib.suppress(OSError, ValueError):
                self.stream.write(self._json(entries) if self.json_lines else self._text(entries))
                self.stream.flush()

    async def flush_forever(self, interval: float = 0.05) -> None:
        """Write what requests recorded, ``interval`` after the first of them; an idle worker does not
        wake up for it (a fleet has hundreds of idle workers). Once more when cancelled (at shutdown)."""
        try:
            while True:
                await self._waiting.wait()
                await asyncio.sleep(interval)
                self._waiting.clear()
                self.flush()
        finally:
            self.flush()


# Requests of probes and scrapers: counted in the metrics, kept out of the access log (CE_ACCESS_LOG_PROBES).
PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestBookkeeper:
    """Per-request bookkeeping, the same for both ways in (``HotPath`` and ``BookkeepingMiddleware``): the
    request id, the in-flight count, metrics and the access-log entry."""

    def __init__(self, metrics: Metrics, access_log: AccessLog | None, *, log_probes: bool = False) -> None:
        self.metrics, self.access_log = metrics, access_log
        self.unlogged = frozenset() if log_probes else PROBE_ROUTES
        self.in_flight = 0  # sampled into the in-flight gauge every second (a gauge write costs more)
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time()):x}-"

    def request_id(self, supplied: bytes | None) -> bytes:
        """The caller's ``X-Request-ID`` if it is usable, else a new one unique to this worker."""
        if supplied is not None and _REQUEST_ID_RE.fullmatch(supplied):
            return supplied
        return (self._id_prefix + format(next(self._ids), "x")).encode()

    def finish(self, scope: Scope, route: str, request_id: bytes, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        method = scope["method"]
        self.metrics.observe(route, method, status, elapsed)
        if self.access_log is not None and route not in self.unlogged:
            self.access_log.record(
                time.time(), request_id, method, scope["path"], route, status, elapsed, scope.get(ORG_KEY)
            )


class BookkeepingMiddleware:
    """ASGI middleware for every request the hot path does not answer itself: request id, in-flight
    count, metrics and the access log, through ``RequestBookkeeper``."""

    def __init__(self, app: Any, bookkeeper: RequestBookkeeper) -> None:
        self.app, self.bookkeeper = app, bookkeeper

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bookkeeper = self.bookkeeper
        started = time.perf_counter()
        supplied = next((value for name, value in scope["headers"] if name == REQUEST_ID), None)
        request_id = bookkeeper.request_id(supplied)
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID, request_id)]
            await send(message)

        bookkeeper.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            bookkeeper.in_flight -= 1
            bookkeeper.finish(scope, route_of(scope["path"]), request_id, status, started)
