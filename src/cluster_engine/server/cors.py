"""CORS for browser front ends on other origins: Starlette's CORSMiddleware, configured for this API.

Off unless ``CE_CORS_ORIGINS`` lists origins (or is ``*``). The middleware sits outside the rate limiter
and the read hot path, so every answer a listed origin gets carries ``Access-Control-Allow-Origin``:
lists, 304s, and the 400/401/404/429/503 error bodies too (a browser hides an answer without it from
the page, error bodies included). It answers preflights (``OPTIONS`` with ``Access-Control-Request-
Method``) itself, for every path and operation; an origin not listed gets no ``Access-Control-Allow-
Origin``, so the browser refuses the page the answer. Credentials (cookies, HTTP authentication) are
never allowed: callers send their token in ``Authorization``, which needs no credentials mode, and that
is what makes ``*`` safe to offer.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

METHODS = ("GET", "HEAD", "POST", "PATCH", "DELETE")
ALLOW_HEADERS = ("Authorization", "Content-Type", "If-None-Match", "X-Request-ID")
EXPOSE_HEADERS = ("ETag", "Link", "Location", "Retry-After", "WWW-Authenticate", "X-Request-ID")
MAX_AGE = 600  # seconds a browser may reuse a preflight's answer


def parse_origins(raw: str) -> tuple[str, ...]:
    """``CE_CORS_ORIGINS``: comma-separated ``scheme://host[:port]`` origins, or ``*`` alone."""
    origins = tuple(part.strip() for part in raw.split(",") if part.strip())
    if "*" in origins:
        if len(origins) > 1:
            raise ValueError("'*' already allows every origin: give it alone")
        return origins
    for origin in origins:
        parts = urlsplit(origin)
        _ = parts.port  # raises ValueError for a port that is not a number in range
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path
            or parts.query
            or parts.fragment
            or parts.username is not None
            or origin != f"{parts.scheme}://{parts.netloc}"
            or origin != origin.lower()
        ):
            raise ValueError(
                f"{origin!r} is not an origin: scheme://host[:port] in lower case, no path or trailing slash"
            )
    return origins


class Cors(CORSMiddleware):
    """Starlette's middleware, its configuration, origin check and preflight answers as they are; only
    the headers it adds to every other answer are prebuilt here (per listed origin) and appended in one
    step, instead of parsing the request's and the answer's headers into header objects on each request:
    `python -m bench micro --cors` measured that at about twice the hot path's own cost."""

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(app, **options)
        expose = [
            (b"access-control-expose-headers", self.simple_headers["Access-Control-Expose-Headers"].encode())
        ]
        self._vary = [(b"vary", b"Origin")]
        self._any = (
            [(b"access-control-allow-origin", b"*"), *expose, *self._vary] if self.allow_all_origins else None
        )
        self._listed = {
            origin.encode("latin-1"): [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                *expose,
                *self._vary,
            ]
            for origin in self.allow_origins
            if origin != "*"
        }

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
                break
        if origin is not None and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "access-control-request-method" in headers:
                await self.preflight_response(request_headers=headers)(scope, receive, send)
                return
        extra = self._vary if origin is None else self._any or self._listed.get(origin, self._vary)

        async def send_with_cors(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                headers = list(message.get("headers", ()))
                vary = [i for i, (name, _) in enumerate(headers) if name.lower() == b"vary"]
                if vary:  # none of this service's answers sets Vary; keep any that does intact
                    i = vary[0]
                    headers[i] = (b"vary", headers[i][1] + b", Origin")
                    headers += extra[:-1]
                else:
                    headers += extra
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_cors)


def with_cors(app: Any, origins: tuple[str, ...]) -> Any:
    if not origins:
        return app
    return Cors(
        app,
        allow_origins=origins,
        allow_methods=METHODS,
        allow_headers=ALLOW_HEADERS,
        allow_credentials=False,
        expose_headers=EXPOSE_HEADERS,
        max_age=MAX_AGE,
    )
