"""create_app(settings): store → catalog → routes, auth, error mapping, lifespan.

Outermost is ``HotPath``, which answers ``GET /v1/images`` and ``GET /v1/images/{id}`` itself (raw ASGI,
see hotpath.py) and passes everything else to Starlette. There, ServerErrorMiddleware turns anything
unexpected into the 500 contract body; ExceptionMiddleware maps ApiError (and routing's 404/405) onto
contract bodies. Handlers only raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import images, openapi
from .auth import Verifier
from .catalog import Catalog
from .config import Settings
from .errors import INTERNAL_ERROR_BODY, ApiError, MethodNotAllowed, NotFound, Unavailable
from .hotpath import GetImage, HotPath, ListImages
from .schemas import json_encoder
from .store import Store

log = logging.getLogger(__name__)
JSON = "application/json"


def _error_response(error: ApiError) -> Response:
    return Response(error.body(), status_code=error.status, media_type=JSON, headers=error.headers())


async def on_api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def on_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        response = _error_response(MethodNotAllowed("method not allowed"))
        if exc.headers and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    if exc.status_code == 404:
        return _error_response(NotFound("not found"))
    return _error_response(ApiError(exc.detail if exc.status_code < 500 else ""))


async def on_database_error(_request: Request, exc: Exception) -> Response:
    """A database that is down, unreachable, or too slow is a 503; anything else it raises is a bug."""
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout):
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return _error_response(Unavailable())
    return await on_unexpected(_request, exc)


async def on_unexpected(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return Response(INTERNAL_ERROR_BODY, status_code=500, media_type=JSON)


async def healthz(_request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


async def readyz(request: Request) -> Response:
    catalog: Catalog = request.app.state.catalog
    try:
        await catalog.ensure_fresh()
    except Unavailable as exc:
        return _error_response(exc)
    body = {"status": "ready", "revision": catalog.revision, "images": len(catalog)}
    return Response(json_encoder.encode(body), media_type=JSON)


async def openapi_json(_request: Request) -> Response:
    return Response(openapi.document_json(), media_type=JSON)


async def openapi_yaml(_request: Request) -> Response:
    return Response(openapi.document_yaml(), media_type="application/yaml")


def create_app(settings: Settings) -> HotPath:
    verifier = Verifier(settings)
    list_images, get_image = ListImages(), GetImage()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store.open(settings.database_url)
        catalog = Catalog(
            store,
            freshness_bound=settings.freshness_bound,
            cache_size=settings.response_cache_size,
            max_images=settings.cache_images,
            max_orgs=settings.cache_orgs,
        )
        app.state.store = store
        app.state.catalog = catalog
        list_images.bind(catalog, verifier)
        get_image.bind(catalog, verifier)
        try:
            await catalog.refresh()
        except Exception as exc:  # serve 503s until the database answers; the poller keeps trying
            log.warning("initial catalog load failed: %s: %s", exc.__class__.__name__, exc)
        tasks = [asyncio.create_task(catalog.poll_forever(settings.poll_interval), name="catalog-poller")]
        if store.is_postgres:
            tasks.append(asyncio.create_task(catalog.listen_forever(), name="catalog-listener"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await store.close()

    app = Starlette(
        routes=[
            Route("/v1/images", list_images, methods=["GET"]),
            Route("/v1/images", images.create_image, methods=["POST"]),
            Route("/v1/images/{id}", get_image, methods=["GET"]),
            Route("/v1/images/{id}", images.patch_image, methods=["PATCH"]),
            Route("/v1/images/{id}", images.delete_image, methods=["DELETE"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/openapi.yaml", openapi_yaml, methods=["GET"]),
        ],
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http_exception,
            SQLAlchemyError: on_database_error,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.verifier = verifier
    return HotPath(app, list_images, get_image)
