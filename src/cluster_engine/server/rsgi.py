"""The service over Granian's RSGI interface (``CE_SERVER_INTERFACE=rsgi``).

``RsgiService`` answers ``GET /v1/images`` and ``GET /v1/images/{id}`` (at the root, under ``/api`` and
under CE_ROOT_PATH) itself, with ``protocol.response_bytes``, and passes every other request through the
RSGI-to-ASGI bridge (rsgibridge.py) into the whole ASGI service (``create_app``), which also runs its
lifespan. The read path here is the ASGI ``HotPath``'s (reads.py) other way in, over the same parts: the
same endpoints (``ListImages`` / ``GetImage``: authentication, parsing, the read model, errors as
``ApiError`` answers), the same ``RequestBookkeeper`` (request id, in-flight count, metrics, access
log) and the same prefix rule (prefix.py); what is RSGI's own is only how the request's headers are
read and how the answer is handed over (RSGI takes ``str`` header tuples: a cached answer's prebuilt
headers are converted once and kept on it, ``wire.Prebuilt``).

With CORS or the rate limiter configured (ASGI middleware in front of the read path) the read path is not
taken here: every request goes through the bridge, so those answers are unchanged too.

Headers whose value is not visible ASCII are not shown to RSGI applications (Granian leaves them out).
Such an Authorization is refused as an invalid token, as over ASGI (``UNREADABLE_AUTHORIZATION``); but
beside a readable one it goes unseen, so the pair is not refused as several Authorization headers. Such
an If-None-Match or X-Request-ID counts as absent (over ASGI: matches no ETag, is replaced by a new id).
"""

from __future__ import annotations

import time
from typing import Any

from .app import Served
from .auth import SEVERAL_AUTHORIZATIONS
from .prefix import API, split_prefix, with_prefix
from .reads import _ReadEndpoint
from .rsgibridge import UNREADABLE_AUTHORIZATION, Bridge, Lifespan
from .wire import ITEM_PREFIX, ITEM_ROUTE, LIST_PATH, Headers, Prebuilt, StrHeaders

_REQUEST_ID = "x-request-id"


def str_headers(headers: Headers) -> StrHeaders:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


class RsgiService:
    """Granian's RSGI target: the read path answered here, the rest through ``Bridge``."""

    def __init__(self, served: Served) -> None:
        self.bridge = Bridge(served.asgi)
        self.lifespan = Lifespan(served.asgi, self.bridge.state)
        reads = served.reads
        self.reads = reads is not None
        if reads is not None:
            self.list_images, self.get_image = reads.list_images, reads.get_image
            self.observer, self.root_path = reads.observer, reads.root_path

    def __rsgi_init__(self, loop: Any) -> None:
        loop.run_until_complete(self.lifespan.startup())

    def __rsgi_del__(self, loop: Any) -> None:
        loop.run_until_complete(self.lifespan.shutdown())

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if self.reads and scope.method == "GET" and scope.proto == "http":
            path: str = scope.path
            prefix = b""
            if self.root_path or path.startswith(API):
                cut, root = split_prefix(path, self.root_path)
                if root:
                    path, prefix = path[cut:] or "/", root.encode("utf-8")
            if path == LIST_PATH:
                return await self._serve(self.list_images, LIST_PATH, path, scope, protocol, prefix)
            if path.startswith(ITEM_PREFIX):
                rest = path[len(ITEM_PREFIX) :]
                if rest and "/" not in rest:
                    return await self._serve(self.get_image, ITEM_ROUTE, path, scope, protocol, prefix)
        await self.bridge(scope, protocol)

    async def _serve(
        self, endpoint: _ReadEndpoint, route: str, path: str, scope: Any, protocol: Any, prefix: bytes
    ) -> None:
        observer = self.observer
        started = time.perf_counter()
        observer.in_flight += 1
        authorization, if_none_match, supplied_id = request_headers(scope.headers)
        request_id = observer.request_id(supplied_id)
        # what the endpoints and the observer read of an ASGI scope
        request = {"method": "GET", "path": path, "query_string": scope.query_string.encode()}
        status = 500
        try:
            status, headers, body = await endpoint.answer_safely(request, authorization, if_none_match)
            if prefix:  # the same list when it has no Location or Link to prefix (then still Prebuilt)
                headers = with_prefix(headers, prefix)
            if isinstance(headers, Prebuilt):  # a cached answer's headers: converted once
                if headers.text is None:
                    headers.text = str_headers(headers)
                converted = headers.text
            else:
                converted = str_headers(headers)
            protocol.response_bytes(status, [*converted, (_REQUEST_ID, request_id.decode())], body)
        finally:
            observer.in_flight -= 1
            observer.finish(request, route, request_id, status, started)


def request_headers(headers: Any) -> tuple[bytes | None, bytes | None, bytes | None]:
    """What ``reads.request_headers`` takes from an ASGI scope, from RSGI's headers: Authorization (several
    are ``SEVERAL_AUTHORIZATIONS``), the last If-None-Match and the first X-Request-ID."""
    authorizations = headers.get_all("authorization")
    if len(authorizations) == 1:
        authorization: bytes | None = authorizations[0].encode("latin-1")
    elif authorizations:
        authorization = SEVERAL_AUTHORIZATIONS
    else:
        authorization = UNREADABLE_AUTHORIZATION if "authorization" in headers else None
    if_none_match = headers.get_all("if-none-match")  # the last one, as reads.request_headers
    request_id = headers.get(_REQUEST_ID)
    return (
        authorization,
        if_none_match[-1].encode("latin-1") if if_none_match else None,
        None if request_id is None else request_id.encode("latin-1"),
    )
