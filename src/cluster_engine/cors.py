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

from typing import Any
from urllib.parse import urlsplit

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


def with_cors(app: Any, origins: tuple[str, ...]) -> Any:
    if not origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_methods=METHODS,
        allow_headers=ALLOW_HEADERS,
        allow_credentials=False,
        expose_headers=EXPOSE_HEADERS,
        max_age=MAX_AGE,
    )
