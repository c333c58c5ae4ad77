"""The read path, as raw ASGI: ``GET /v1/images`` and ``GET /v1/images/{id}``.

These two endpoints are most of the traffic, so they skip the framework's request/response objects and
middleware: ``HotPath`` is the first app inside the connection-level wrappers (keepalive.py, and CORS
and the rate limiter when they are on), answers these requests with ``ListImages`` / ``GetImage``
and does their request-id, metrics and access-log bookkeeping inline (``Observer``); everything else
(and HEAD) goes through ``Observability`` and Starlette, whose router mounts the same two endpoints, so
there is one implementation either way. Per request the work is: one pass over the headers, look the
token up in the verified-token cache, look the query string up in a parsed-query cache, check
freshness, look the serialized answer up in the catalog's response cache, send prebuilt headers.
Errors are the same ``ApiError`` contract bodies as everywhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from . import validation, visibility
from .auth import SEVERAL_AUTHORIZATIONS, Verifier
from .catalog import Catalog, Rendered
from .errors import INTERNAL_ERROR_BODY, ApiError, NotFound
from .observability import ORG_KEY, REQUEST_ID, Observer
from .prefix import API, Prefixes

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Headers = list[tuple[bytes, bytes]]

LIST_PATH = "/v1/images"
ITEM_PREFIX = "/v1/images/"
ITEM_ROUTE = "/v1/images/{id}"
JSON = b"application/json"
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


def request_headers(scope: Scope) -> tuple[bytes | None, bytes | None, bytes | None]:
    """One pass for the headers the read path uses: Authorization, If-None-Match, X-Request-ID.
    Several Authorization fields become ``SEVERAL_AUTHORIZATIONS``, which the verifier refuses."""
    authorization = if_none_match = request_id = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value if authorization is None else SEVERAL_AUTHORIZATIONS
        elif name == b"if-none-match":
            if_none_match = value
        elif name == REQUEST_ID and request_id is None:
            request_id = value
    return authorization, if_none_match, request_id


class _ReadEndpoint:
    """Shared plumbing: resolve the app's state lazily (it exists only after lifespan startup)."""

    def __init__(self) -> None:
        self.catalog: Catalog | None = None
        self.verifier: Verifier | None = None

    def bind(self, catalog: Catalog, verifier: Verifier) -> None:
        self.catalog, self.verifier = catalog, verifier

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """As an ASGI endpoint (mounted in Starlette's router: HEAD, and GET when not in front)."""
        authorization, if_none_match, _ = request_headers(scope)
        status, headers, body = await self.answer_safely(scope, authorization, if_none_match)
        await send_answer(send, status, headers, body, scope["method"] == "HEAD")

    async def answer_safely(
        self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None
    ) -> tuple[int, Headers, bytes]:
        try:
            return await self.answer(scope, authorization, if_none_match)
        except ApiError as error:
            return error_answer(error)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            return (
                500,
                [(b"content-type", JSON), (b"content-length", str(len(INTERNAL_ERROR_BODY)).encode())],
                INTERNAL_ERROR_BODY,
            )

    async def answer(
        self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None
    ) -> tuple[int, Headers, bytes]:
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

    async def answer(
        self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None
    ) -> tuple[int, Headers, bytes]:
        catalog, verifier = self.catalog, self.verifier
        assert catalog is not None and verifier is not None
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
    def __init__(self) -> None:
        super().__init__()
        self._ids: dict[str, str] = {}  # path segment -> canonical id, for ids asked for again

    def _image_id(self, raw: str) -> str:
        image_id = self._ids.get(raw)
        if image_id is None:
            image_id = str(validation.image_id(raw))  # raises RequestInvalid: not cached
            if len(self._ids) >= _QUERY_CACHE_SIZE:
                self._ids.clear()
            self._ids[raw] = image_id
        return image_id

    async def answer(
        self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None
    ) -> tuple[int, Headers, bytes]:
        catalog, verifier = self.catalog, self.verifier
        assert catalog is not None and verifier is not None
        caller = verifier.authenticate(authorization)
        scope[ORG_KEY] = caller.org
        image_id = self._image_id(scope["path"][len(ITEM_PREFIX) :])
        if not catalog.is_fresh():
            await catalog.ensure_fresh()
        if catalog.org_shelf(caller.org) is None:
            await catalog.load_org(caller.org)  # every image the caller may see is now held
        entry = catalog.get(image_id)
        if entry is None or not visibility.can_see_namespace(caller, entry.namespace):
            raise NotFound(visibility.NOT_FOUND)
        return self.rendered_answer(catalog.item(entry), if_none_match)


class HotPath:
    """The app behind KeepAliveGuard (and CORS and the rate limiter, when on): answers the two read endpoints
    directly, passes the rest on to ``app``. A request under a prefix (``/api``, a root path: prefix.py)
    goes through ``Prefixes`` first, which strips it and comes back to ``route``; a request without one
    pays two tests for that here instead of a middleware layer of its own (0.4 µs, bench/micro.py)."""

    def __init__(
        self, app: Any, list_images: ListImages, get_image: GetImage, observer: Observer, root_path: str = ""
    ) -> None:
        self.app, self.list_images, self.get_image, self.observer = app, list_images, get_image, observer
        self.root_path = root_path
        self.prefixed = Prefixes(self.route, root_path)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.root_path or scope.get("root_path"):
            return await self.prefixed(scope, receive, send)
        path = scope["path"]
        if scope["method"] == "GET":
            if path == LIST_PATH:
                return await self._serve(self.list_images, LIST_PATH, scope, send)
            if path.startswith(ITEM_PREFIX):
                rest = path[len(ITEM_PREFIX) :]
                if rest and "/" not in rest:
                    return await self._serve(self.get_image, ITEM_ROUTE, scope, send)
        if path.startswith(API):
            return await self.prefixed(scope, receive, send)
        await self.app(scope, receive, send)

    async def route(self, scope: Scope, receive: Any, send: Any) -> None:
        """A request whose prefix ``Prefixes`` took off: the same answers as without one. The tests are
        ``__call__``'s, written out again: a helper returning the endpoint cost 0.5-1.4 µs per request on
        the root path (bench/micro.py, two alternated pairs)."""
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == LIST_PATH:
                return await self._serve(self.list_images, LIST_PATH, scope, send)
            if path.startswith(ITEM_PREFIX):
                rest = path[len(ITEM_PREFIX) :]
                if rest and "/" not in rest:
                    return await self._serve(self.get_image, ITEM_ROUTE, scope, send)
        await self.app(scope, receive, send)

    async def _serve(self, endpoint: _ReadEndpoint, route: str, scope: Scope, send: Any) -> None:
        observer = self.observer
        started = time.perf_counter()
        observer.in_flight += 1
        authorization, if_none_match, supplied_id = request_headers(scope)
        request_id = observer.request_id(supplied_id)
        status = 500
        try:
            status, headers, body = await endpoint.answer_safely(scope, authorization, if_none_match)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*headers, (REQUEST_ID, request_id)],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            observer.in_flight -= 1
            observer.finish(scope, route, request_id, status, started)
