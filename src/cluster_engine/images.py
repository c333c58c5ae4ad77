"""HTTP handlers for images: decode → rule → catalog → encode. Errors are raised, never built here."""

from __future__ import annotations

import hashlib

from starlette.requests import Request
from starlette.responses import Response

from . import validation
from .auth import Principal, Verifier
from .catalog import Catalog, Rendered
from .errors import NotFound

JSON = "application/json"
CACHE_CONTROL = "private, max-age=0"


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2) of an If-None-Match list against our strong ETag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def respond(request: Request, rendered: Rendered) -> Response:
    headers = {"ETag": rendered.etag, "Cache-Control": CACHE_CONTROL}
    if etag_matches(request.headers.get("if-none-match"), rendered.etag):
        return Response(status_code=304, headers=headers)
    return Response(rendered.body, media_type=JSON, headers=headers)


def principal(request: Request) -> Principal:
    verifier: Verifier = request.app.state.verifier
    return verifier.authenticate(request.headers.get("authorization"))


async def list_images(request: Request) -> Response:
    caller = principal(request)
    query = validation.list_query({name: request.query_params.getlist(name) for name in ("idc", "product")})
    catalog: Catalog = request.app.state.catalog
    await catalog.ensure_fresh()
    return respond(request, catalog.list(caller.org_id, query.idc, query.product))


async def get_image(request: Request) -> Response:
    caller = principal(request)
    image_id = validation.image_id(request.path_params["id"])
    catalog: Catalog = request.app.state.catalog
    await catalog.ensure_fresh()
    entry = catalog.get(caller.org_id, image_id)
    if entry is None:
        raise NotFound("image not found")
    etag = '"' + hashlib.blake2b(entry.json, digest_size=16).hexdigest() + '"'
    return respond(request, Rendered(body=entry.json, etag=etag))
