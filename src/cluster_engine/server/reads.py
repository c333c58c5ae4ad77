"""The read path, as raw ASGI: ``GET /v1/images`` and ``GET /v1/images/{id}``.

These two endpoints are most of the traffic, so they skip the framework's request/response objects and
middleware: ``HotPath`` is the first app inside the connection-level wrappers (keepalive.py, and CORS and
the rate limiter when they are on), answers these requests with ``ListImages`` / ``GetImage`` and does
their request-id, metrics and access-log bookkeeping inline (``RequestBookkeeper``); everything else (and
HEAD) goes through ``BookkeepingMiddleware`` and Starlette, whose router mounts the same two endpoints, so
there is one implementation either way. Per request the work is: one pass over the headers, look the token
up in the verified-token cache, look the query string up in a parsed-query cache, check freshness, look
the serialized answer up in the catalog's response cache, send prebuilt headers.
Errors are the same ``ApiError`` contract bodies as everywhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from . import permissions, validation
from .auth import SEVERAL_AUTHORIZATIONS, Verifier
from .errors import ApiError, NoSuchResource
from .observability import ORG_KEY, REQUEST_ID, RequestBookkeeper
from .prefix import API, Prefixes
from .readmodel import Catalog
from .wire import INTERNAL_ERROR_ANSWER, ITEM_PREFIX, ITEM_ROUTE, LIST_PATH, Answer, Headers, error_answer

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
_QUERY_CACHE_SIZE = 4096
_LIST_PARAMETERS = frozenset(("idc", "product", "limit", "cursor"))


async def send_answer(send: Any, status: int, headers: Headers, body: bytes, head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


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
    """Shared plumbing: the read model and the verifier, and errors turned into answers."""

    def __init__(self, catalog: Catalog, verifier: Verifier) -> None:
        self.catalog, self.verifier = catalog, verifier

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """As an ASGI endpoint (mounted in Starlette's router: HEAD, and GET when not in front)."""
        authorization, if_none_match, _ = request_headers(scope)
        status, headers, body = await self.answer_safely(scope, authorization, if_none_match)
        await send_answer(send, status, headers, body, scope["method"] == "HEAD")

    async def answer_safely(
        self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None
    ) -> Answer:
        try:
            return await self.answer(scope, authorization, if_none_match)
        except ApiError as error:
            return error_answer(error)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            return INTERNAL_ERROR_ANSWER

    async def answer(self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None) -> Answer:
        raise NotImplementedError


class ListQueries:
    """Query strings of ``GET /v1/images`` parsed once (a bounded cache of the valid ones)."""

    def __init__(self) -> None:
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


class ListImages(_ReadEndpoint, ListQueries):
    def __init__(self, catalog: Catalog, verifier: Verifier) -> None:
        _ReadEndpoint.__init__(self, catalog, verifier)
        ListQueries.__init__(self)

    async def answer(self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None) -> Answer:
        caller = self.verifier.authenticate(authorization)
        scope[ORG_KEY] = caller.org
        query = self._query(scope["query_string"])
        view = await self.catalog.view(caller.org)
        return view.list(query).answer(if_none_match)


class GetImage(_ReadEndpoint):
    def __init__(self, catalog: Catalog, verifier: Verifier) -> None:
        super().__init__(catalog, verifier)
        self._ids: dict[str, str] = {}  # path segment -> canonical id, for ids asked for again

    def _image_id(self, raw: str) -> str:
        image_id = self._ids.get(raw)
        if image_id is None:
            image_id = str(validation.image_id(raw))  # raises RequestInvalid: not cached
            if len(self._ids) >= _QUERY_CACHE_SIZE:
                self._ids.clear()
            self._ids[raw] = image_id
        return image_id

    async def answer(self, scope: Scope, authorization: bytes | None, if_none_match: bytes | None) -> Answer:
        caller = self.verifier.authenticate(authorization)
        scope[ORG_KEY] = caller.org
        image_id = self._image_id(scope["path"][len(ITEM_PREFIX) :])
        rendered = (await self.catalog.view(caller.org)).get(image_id)
        if rendered is None:  # an image the caller may not see is the same 404 as a missing one
            raise NoSuchResource(permissions.NOT_FOUND)
        return rendered.answer(if_none_match)


class HotPath:
    """The app behind KeepAliveGuard (and CORS and the rate limiter, when on): answers the two read endpoints
    directly, passes the rest on to ``app``. A request under a prefix (``/api``, a root path: prefix.py)
    goes through ``Prefixes`` first, which strips it and comes back to ``route``; a request without one
    pays two tests for that here instead of a middleware layer of its own (0.4 µs, ``bench micro``)."""

    def __init__(
        self,
        app: Any,
        list_images: ListImages,
        get_image: GetImage,
        observer: RequestBookkeeper,
        root_path: str = "",
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
        the root path (`python -m bench micro`, two alternated pairs)."""
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
