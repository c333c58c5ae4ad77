"""create_app(settings): store → catalog → routes, auth, error mapping, lifespan.

Outermost is ``KeepAliveGuard`` (keepalive.py: an answer that did not read the request body leaves a
reusable connection or says ``Connection: close``), then CORS and the rate limiter, each when configured
(cors.py, ratelimit.py), then ``HotPath``, which takes an ``/api`` (or CE_ROOT_PATH) prefix off through
``Prefixes`` (prefix.py), answers ``GET /v1/images`` and ``GET /v1/images/{id}`` itself (raw ASGI, see
reads.py) and passes everything else to Starlette (``Rejoin`` in front of it puts the prefix back into
the path, as Starlette expects). There, ServerErrorMiddleware turns anything unexpected into the 500
contract body; ExceptionMiddleware maps ApiError (and routing's 404/405) onto contract bodies. Handlers
only raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from ..invalid import Invalid
from ..schemas import json_encoder
from ..storage import db
from ..storage.errors import StoreError
from ..storage.schema_check import UPGRADE_HINT, schema_problem
from ..storage.standby import Standby
from ..storage.store import Store
from . import docs_page, logformat, openapi, revisionboard, writes
from .auth import Verifier
from .bodydeadline import BodyDeadline
from .config import Settings
from .cors import with_cors
from .errors import ApiError, MethodNotAllowed, NoSuchResource, Unavailable, of_storage
from .keepalive import KeepAliveGuard
from .observability import AccessLog, BookkeepingMiddleware, Metrics, RequestBookkeeper
from .prefix import Rejoin
from .ratelimit import Buckets, Rate, RateLimit
from .readmodel import Catalog
from .reads import GetImage, HotPath, ListImages
from .wire import INTERNAL_ERROR_ANSWER, JSON_TYPE, error_response, response

log = logging.getLogger(__name__)
JSON = JSON_TYPE
SHUTDOWN_TIMEOUT = 5.0


async def on_api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def on_store_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreError | Invalid)
    return error_response(of_storage(exc))


def _allowed_methods(request: Request) -> str:
    """Every method any route serves at this path (Starlette reports only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        response = error_response(MethodNotAllowed("method not allowed"))
        response.headers["Allow"] = _allowed_methods(request)
        return response
    if exc.status_code == 404:
        return error_response(NoSuchResource("not found"))
    return error_response(ApiError(exc.detail if exc.status_code < 500 else ""))


async def on_database_error(_request: Request, exc: Exception) -> Response:
    """A database that is down, unreachable, or too slow is a 503; anything else it raises is a bug."""
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout):
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return error_response(Unavailable())
    return await on_unexpected(_request, exc)


async def on_unexpected(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return response(INTERNAL_ERROR_ANSWER)


async def healthz(_request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


async def readyz(request: Request) -> Response:
    """Ready: the database answers, its schema is at our migration head (asked first: an unmigrated
    database would otherwise look unavailable), the read model is fresh."""
    catalog: Catalog = request.app.state.catalog
    store: Store = request.app.state.store
    try:
        problem = await asyncio.wait_for(schema_problem(store), timeout=1.0)
    except Exception:
        return error_response(Unavailable())
    if problem is not None:
        return error_response(Unavailable(f"{problem}: {UPGRADE_HINT}"))
    try:
        await catalog.ensure_fresh()
    except Exception:
        return error_response(Unavailable())
    body = {"status": "ready", "revision": catalog.revision, "images": len(catalog)}
    return Response(json_encoder.encode(body), media_type=JSON)


async def openapi_json(_request: Request) -> Response:
    return Response(openapi.document_json(), media_type=JSON)


async def openapi_yaml(_request: Request) -> Response:
    return Response(openapi.document_yaml(), media_type="application/yaml")


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


async def _report_state(
    catalog: Catalog, store: Store, metrics: Metrics, bookkeeper: RequestBookkeeper
) -> None:
    """Keep the read-model, pool and in-flight gauges current (each worker reports its own)."""
    while True:
        metrics.in_flight.set(bookkeeper.in_flight)
        held = catalog.held()
        for kind in ("Public", "Customized"):
            metrics.catalog_images.labels(kind).set(held[kind])
        metrics.catalog_revision.set(catalog.revision or 0)
        metrics.catalog_age.set(max(0.0, time.monotonic() - catalog.confirmed_at) if catalog.revision else -1)
        metrics.db_pool_checked_out.set(store.pool_in_use())
        await asyncio.sleep(1.0)


def open_store(settings: Settings) -> Store:
    """The store ``settings`` ask for (connections open on first use; ``Store.close`` closes them)."""
    return Store(
        db.create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_pool_overflow,
        ),
        settings.database_url,
        standby=None
        if settings.database_read_url is None
        else Standby.open(
            settings.database_read_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_pool_overflow,
        ),
    )


@dataclass(frozen=True)
class Served:
    """The service for one worker: the ASGI application (the whole service), and the read path that
    answers ``GET /v1/images…`` in front of it, for a server interface that calls it directly (rsgi.py);
    None when CORS or the rate limiter sit in front of it (they are ASGI middleware)."""

    asgi: KeepAliveGuard
    reads: HotPath | None


def create_app(settings: Settings) -> KeepAliveGuard:
    """The ASGI application of the whole service."""
    return build(settings).asgi


def build(settings: Settings) -> Served:
    verifier = Verifier(settings)
    metrics = Metrics()
    verifier.on_failure = lambda failure: metrics.auth_failures.labels(failure.reason).inc()
    access_log = (
        AccessLog(json_lines=logformat.resolve(settings.log_format) == "json")
        if settings.access_log
        else None
    )
    bookkeeper = RequestBookkeeper(metrics, access_log, log_probes=settings.access_log_probes)
    store = open_store(settings)
    catalog = Catalog(
        store,
        freshness_bound=settings.freshness_bound,
        cache_size=settings.response_cache_size,
        max_images=settings.cache_images,
        max_orgs=settings.cache_orgs,
        compress_after=2000 if settings.cache_compress else None,
        board=revisionboard.inherited(),
    )
    catalog.on_refresh_failure = lambda: metrics.db_errors.labels("refresh").inc()
    catalog.on_poll = lambda source: metrics.catalog_polls.labels(source).inc()
    store.on_commit = catalog.apply_own
    list_images, get_image = ListImages(catalog, verifier), GetImage(catalog, verifier)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Building the read model allocates up to millions of long-lived objects: the cyclic collector would
        # traverse them again and again meanwhile (start-up grows with their square), and afterwards on every
        # full collection that requests' garbage triggers (100+ ms each at a million images). So it is off
        # while they are built, and then they are frozen out of its reach.
        gc.disable()
        try:
            await catalog.refresh()
            await catalog.preload()  # a starting (or respawned) worker is ready already holding its orgs
        except Exception as exc:  # serve 503s until the database answers; the poller keeps trying
            log.warning("initial catalog load failed: %s: %s", exc.__class__.__name__, exc)
        finally:
            gc.collect()
            gc.freeze()
            gc.enable()
        tasks = [
            asyncio.create_task(catalog.poll_forever(settings.poll_interval), name="catalog-poller"),
            asyncio.create_task(_report_state(catalog, store, metrics, bookkeeper), name="metrics-reporter"),
        ]
        tasks.append(asyncio.create_task(metrics.flush_forever(), name="metrics-flusher"))
        if store.is_postgres and settings.db_listen:
            tasks.append(asyncio.create_task(catalog.listen_forever(), name="catalog-listener"))
        if access_log is not None:
            tasks.append(asyncio.create_task(access_log.flush_forever(), name="access-log"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            try:  # bounded: a database that went away must not keep a stopping worker alive
                async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                    await asyncio.gather(*tasks, return_exceptions=True)
                    await store.close()
            except TimeoutError:
                log.warning("shutdown: gave up closing database connections after %ss", SHUTDOWN_TIMEOUT)

    app = Starlette(
        routes=[
            Route("/v1/images", list_images, methods=["GET"]),
            Route("/v1/images", writes.create_image, methods=["POST"]),
            Route("/v1/images/{id}", get_image, methods=["GET"]),
            Route("/v1/images/{id}", writes.patch_image, methods=["PATCH"]),
            Route("/v1/images/{id}", writes.delete_image, methods=["DELETE"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/openapi.yaml", openapi_yaml, methods=["GET"]),
            *docs_page.routes(),
        ],
        exception_handlers={
            ApiError: on_api_error,
            StoreError: on_store_error,
            Invalid: on_store_error,
            HTTPException: on_http_exception,
            SQLAlchemyError: on_database_error,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.catalog = catalog
    app.state.verifier = verifier
    app.state.metrics = metrics
    reads = HotPath(
        BookkeepingMiddleware(BodyDeadline(Rejoin(app), settings.body_timeout), bookkeeper),
        list_images,
        get_image,
        bookkeeper,
        settings.root_path,
    )
    served: Any = reads
    if settings.rate_limit is not None:
        buckets = Buckets(Rate.parse(settings.rate_limit))
        served = RateLimit(served, buckets, verifier, on_throttle=metrics.throttled.inc)
    served = with_cors(served, settings.cors_origins)
    return Served(KeepAliveGuard(served, settings.body_timeout), reads if served is reads else None)
