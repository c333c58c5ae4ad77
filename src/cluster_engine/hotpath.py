"""The read path, as raw ASGI: ``GET /v1/images`` and ``GET /v1/images/{id}``.

These two endpoints are most of the traffic, so they skip the framework's request/response objects and
middleware: ``HotPath`` sits in front of the Starlette app and hands these requests straight to
``ListImages`` / ``GetImage``; everything else (and HEAD) goes through Starlette, whose router mounts the
same two endpoints, so there is one implementation either way. Per request the work is: find two
headers, look the token up in the verified-token cache, look the query string up in a parsed-query cache,
check freshness, look the serialized answer up in the catalog's response cache, send prebuilt headers.
Errors are the same ``ApiError`` contract bodies as everywhere else.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from . import validation, visibility
from .auth import Verifier
from .catalog import Catalog, Rendered
from .errors import INTERNAL_ERROR_BODY, ApiError, NotFound
from .observability import ORG_KEY

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Headers = list[tuple[bytes, bytes]]

LIST_PATH = "/v1/images"
ITEM_PREFIX = "/v1/images/"
JSON = b"application/json"
CACHE_CONTROL = b"private, max-age=0"
_QUERY_CACHE_SIZE = 4096
_LIST_PARAMETERS = frozenset(("idc", "product", "limit", "cursor"))


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """Weak comparison (RFC 9110 §13.1.2) of an If-None-Match list against our strong ETag."""
    if if_none_match.strip() == b"*":
        return True
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate.startswith(b"W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


async def send_answer(send: Any, status: int, headers: Headers, body: bytes, head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def error_answer(error: ApiError) -> tuple[int, Headers, bytes]:
    body = error.body()
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers().items()]
    return error.status, headers, body


def request_headers(scope: Scope) -> tuple[bytes | None, bytes | None]:
    authorization = if_none_match = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"if-none-match":
            if_none_match = value
    return authorization, if_none_match


class _ReadEndpoint:
    """Shared plumbing: resolve the app's state lazily (it exists only after lifespan startup)."""

    def __init__(self) -> None:
        self.catalog: Catalog | None = None
        self.verifier: Verifier | None = None

    def bind(self, catalog: Catalog, verifier: Verifier) -> None:
        self.catalog, self.verifier = catalog, verifier

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        head = scope["method"] == "HEAD"
        try:
            status, headers, body = await self.answer(scope)
        except ApiError as error:
            status, headers, body = error_answer(error)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            status, headers, body = (
                500,
                [(b"content-type", JSON), (b"content-length", str(len(INTERNAL_ERROR_BODY)).encode())],
                INTERNAL_ERROR_BODY,
            )
        await send_answer(send, status, headers, body, head)

    async def answer(self, scope: Scope) -> tuple[int, Headers, bytes]:
        raise NotImplementedError

    def rendered_answer(self, rendered: Rendered, if_none_match: bytes | None) -> tuple[int, Headers, bytes]:
        if if_none_match is not None and etag_matches(if_none_match, rendered.etag):
            return 304, rendered.headers_304, b""
        return 200, rendered.headers, rendered.body


class ListImages(_ReadEndpoint):
    def __init__(self) -> None:
        super().__init__()
        self._queries: dict[bytes, validation.ListQuery] = {}

    def _query(self, raw: bytes) -> validation.ListQuery:
        query = self._queries.get(raw)
        if query is None:
            params: dict[str, list[str]] = {}
            for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
                if name in _LIST_PARAMETERS:
                    params.setdefault(name, []).append(value)
            query = validation.list_query(params)  # raises RequestInvalid: not cached
            if len(self._queries) >= _QUERY_CACHE_SIZE:
                self._queries.clear()
            self._queries[raw] = query
        return query

    async def answer(self, scope: Scope) -> tuple[int, Headers, bytes]:
        catalog, verifier = self.catalog, self.verifier
        assert catalog is not None and verifier is not None
        authorization, if_none_match = request_headers(scope)
        caller = verifier.authenticate(authorization)
        scope[ORG_KEY] = caller.org
        query = self._query(scope["query_string"])
        if not catalog.is_fresh():
            await catalog.ensure_fresh()
        own = catalog.org_shelf(caller.org)
        if own is None:
            own = await catalog.load_org(caller.org)
        if query.limit is None and query.after is None:
            rendered = catalog.list_images(caller.org, own, query.idc, query.product)
        else:
            rendered = catalog.page(caller.org, own, query)
        return self.rendered_answer(rendered, if_none_match)


class GetImage(_ReadEndpoint):
    async def answer(self, scope: Scope) -> tuple[int, Headers, bytes]:
        catalog, verifier = self.catalog, self.verifier
        assert catalog is not None and verifier is not None
        authorization, if_none_match = request_headers(scope)
        caller = verifier.authenticate(authorization)
        scope[ORG_KEY] = caller.org
        image_id = validation.image_id(scope["path"][len(ITEM_PREFIX) :])
        if not catalog.is_fresh():
            await catalog.ensure_fresh()
        if catalog.org_shelf(caller.org) is None:
            await catalog.load_org(caller.org)  # every image the caller may see is now held
        entry = catalog.get(image_id)
        if entry is None or not visibility.can_see_namespace(caller, entry.namespace):
            raise NotFound(visibility.NOT_FOUND)
        return self.rendered_answer(catalog.item(entry), if_none_match)


class HotPath:
    """ASGI app in front of Starlette that answers the two read endpoints directly."""

    def __init__(self, app: Any, list_images: ListImages, get_image: GetImage) -> None:
        self.app, self.list_images, self.get_image = app, list_images, get_image

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == LIST_PATH:
                return await self.list_images(scope, receive, send)
            if path.startswith(ITEM_PREFIX):
                rest = path[len(ITEM_PREFIX) :]
                if rest and "/" not in rest:
                    return await self.get_image(scope, receive, send)
        await self.app(scope, receive, send)
