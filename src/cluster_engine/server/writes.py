"""HTTP handlers for image writes: decode → rule → store → encode. Errors are raised, never built here.

The read endpoints are in ``reads.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..deadline import within
from ..schemas import ImageCreateReq, ImageResp, json_encoder
from ..storage.records import Actor
from ..storage.store import Store
from . import bodies, permissions, validation, wire
from .auth import Principal, Verifier
from .errors import BodyTooLarge, RequestInvalid, Unavailable
from .observability import ORG_KEY
from .readmodel import Catalog
from .reads import request_headers

log = logging.getLogger(__name__)
T = TypeVar("T")

JSON = wire.JSON_TYPE
# A write that has no answer from the database by then is a 503 (statement_timeout is 5 s: a live but
# slow database answers before this, with its own error).
WRITE_DEADLINE = 6.0
CACHE_CONTROL = wire.CACHE_CONTROL.decode()
MAX_BODY = 1024 * 1024
DRAIN_MAX = 16 * MAX_BODY  # an oversized body up to this size is read (and dropped) before the 413
DRAIN_SECONDS = 5.0
TOO_LARGE = "request body is larger than 1 MiB"


def etag_of(body: bytes) -> str:
    return wire.etag_of(body).decode()


def principal(request: Request) -> Principal:
    verifier: Verifier = request.app.state.verifier
    caller = verifier.authenticate(request_headers(request.scope)[0])
    request.scope[ORG_KEY] = caller.org
    return caller


def actor(caller: Principal) -> Actor:
    return Actor(org_id=caller.org_id, name=caller.subject)


async def _discard_rest(request: Request, size: int) -> bool:
    """Read and drop the rest of an oversized body (bounded in bytes and time), so the client, still
    sending, reads our 413 instead of a reset connection. True when the whole body was consumed."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > DRAIN_MAX:
                    return False
    except TimeoutError:
        return False
    return True


async def read_json(request: Request) -> Any:
    """The request body decoded as JSON, refusing more than MAX_BODY bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        drained = int(declared) <= DRAIN_MAX and await _discard_rest(request, 0)
        raise BodyTooLarge(TOO_LARGE, connection_reusable=drained)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyTooLarge(TOO_LARGE, connection_reusable=await _discard_rest(request, size))
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # invalid UTF-8; nesting too deep
        text = body[:256].decode("utf-8", errors="replace")
        raise RequestInvalid(
            [validation.detail("body", "json", "The body must be a JSON document.", text)]
        ) from None


# --------------------------------------------------------------------------------------------- writes


def _written(image: ImageResp, status: int, extra: dict[str, str] | None = None) -> Response:
    body = json_encoder.encode(image)
    headers = {"ETag": etag_of(body), "Cache-Control": CACHE_CONTROL, **(extra or {})}
    return Response(body, status_code=status, media_type=JSON, headers=headers)


async def _bounded(request: Request, write: Awaitable[T]) -> T:
    """Run a write within WRITE_DEADLINE. Once it commits, the store hands its change to this worker's
    read model (Store.on_commit), so the answer and this worker's next reads show it (read-your-writes)
    without reading the database again. A read model left behind the write (another process wrote in
    between) or not fresh (the database was failing, or failed over, a moment ago, and has just answered)
    catches up at once, so that a read after a write is neither stale nor a 503.

    A database that stops answering (frozen, partitioned) would otherwise hold the request as long as
    TCP does: PostgreSQL's statement_timeout cannot fire in a server that is not running. At the deadline
    the answer is a 503, whose outcome the contract leaves open; the write itself is not cut off
    mid-transaction (deadline.py), it commits or rolls back on its own.
    """

    async def write_then_catch_up() -> T:
        result = await write
        store: Store = request.app.state.store
        read_model: Catalog = request.app.state.catalog
        if read_model.is_fresh() and (read_model.revision or 0) >= store.committed_revision:
            return result
        # A refresh that fails here most likely met a pooled connection to a node that went away or was
        # demoted, which the failure discards (the pool's connections are dropped): once more on new ones.
        for attempt in (1, 2):
            try:
                await read_model.refresh()
                break
            except Exception as exc:  # the write is committed: its answer stands; the poller keeps trying
                log.warning("refresh after a write failed (%d/2): %s", attempt, exc.__class__.__name__)
        return result

    try:
        return await within(write_then_catch_up(), WRITE_DEADLINE)
    except TimeoutError:
        log.warning("write gave no answer within %ss: 503", WRITE_DEADLINE)
        raise Unavailable() from None


async def create_image(request: Request) -> Response:
    caller = principal(request)
    permissions.require_some_write_scope(caller)
    spec, image_type = bodies.read_create_request(await read_json(request))
    permissions.check_create(caller, image_type, spec.orgId)
    store: Store = request.app.state.store
    image = await _bounded(request, store.create_image(spec, image_type, actor(caller)))
    return _written(image, 201, {"Location": f"/v1/images/{image.id}"})


async def patch_image(request: Request) -> Response:
    caller = principal(request)
    permissions.require_some_write_scope(caller)
    image_id = validation.image_id(request.path_params["id"])
    patch = await read_json(request)

    def change(current: ImageResp) -> ImageCreateReq:
        permissions.check_change(caller, current.type, current.orgId)
        return bodies.read_patch(msgspec.to_builtins(current), patch)

    store: Store = request.app.state.store
    image = await _bounded(request, store.update_image(image_id, actor(caller), change))
    return _written(image, 200)


async def delete_image(request: Request) -> Response:
    caller = principal(request)
    permissions.require_some_write_scope(caller)
    image_id = validation.image_id(request.path_params["id"])

    def check(current: ImageResp) -> None:
        permissions.check_change(caller, current.type, current.orgId)

    store: Store = request.app.state.store
    await _bounded(request, store.delete_image(image_id, actor(caller), check))
    return Response(status_code=204)
