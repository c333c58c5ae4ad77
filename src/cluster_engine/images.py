"""HTTP handlers for image writes: decode → rule → store → encode. Errors are raised, never built here.

The read endpoints are in ``hotpath.py``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from . import validation, visibility
from .auth import Principal, Verifier
from .errors import PayloadTooLarge, RequestInvalid
from .hotpath import request_headers
from .observability import ORG_KEY
from .schemas import ImageCreateReq, ImageResp, json_encoder
from .store import Actor, Store

JSON = "application/json"
CACHE_CONTROL = "private, max-age=0"
MAX_BODY = 1024 * 1024


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def principal(request: Request) -> Principal:
    verifier: Verifier = request.app.state.verifier
    caller = verifier.authenticate(request_headers(request.scope)[0])
    request.scope[ORG_KEY] = caller.org
    return caller


def actor(caller: Principal) -> Actor:
    return Actor(org_id=caller.org_id, name=caller.subject)


async def read_json(request: Request) -> Any:
    """The request body decoded as JSON, refusing more than MAX_BODY bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise PayloadTooLarge("request body is larger than 1 MiB")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge("request body is larger than 1 MiB")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        text = body[:256].decode("utf-8", errors="replace")
        raise RequestInvalid(
            [validation.detail("body", "json", "The body must be a JSON document.", text)]
        ) from None


# --------------------------------------------------------------------------------------------- writes


def _written(image: ImageResp, status: int, extra: dict[str, str] | None = None) -> Response:
    body = json_encoder.encode(image)
    headers = {"ETag": etag_of(body), "Cache-Control": CACHE_CONTROL, **(extra or {})}
    return Response(body, status_code=status, media_type=JSON, headers=headers)


async def create_image(request: Request) -> Response:
    caller = principal(request)
    visibility.require_some_write_scope(caller)
    spec, image_type = validation.read_create_request(await read_json(request))
    visibility.check_create(caller, image_type, spec.orgId)
    store: Store = request.app.state.store
    image = await store.create_image(spec, image_type, actor(caller))
    await request.app.state.catalog.refresh()  # read-your-writes on this worker
    return _written(image, 201, {"Location": f"/v1/images/{image.id}"})


async def patch_image(request: Request) -> Response:
    caller = principal(request)
    visibility.require_some_write_scope(caller)
    image_id = validation.image_id(request.path_params["id"])
    patch = await read_json(request)

    def change(current: ImageResp) -> ImageCreateReq:
        visibility.check_change(caller, current.type, current.orgId)
        return validation.read_patch(msgspec.to_builtins(current), patch)

    store: Store = request.app.state.store
    image = await store.update_image(image_id, actor(caller), change)
    await request.app.state.catalog.refresh()
    return _written(image, 200)


async def delete_image(request: Request) -> Response:
    caller = principal(request)
    visibility.require_some_write_scope(caller)
    image_id = validation.image_id(request.path_params["id"])

    def check(current: ImageResp) -> None:
        visibility.check_change(caller, current.type, current.orgId)

    store: Store = request.app.state.store
    await store.delete_image(image_id, actor(caller), check)
    await request.app.state.catalog.refresh()
    return Response(status_code=204)
