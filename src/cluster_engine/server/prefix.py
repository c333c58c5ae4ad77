"""The API under ``/api`` as well as at the root, and behind a proxy that strips a prefix.

The contract's server is ``https://console.gmicloud.ai/api``: a client configured like production calls
``<base>/api/v1/images``. ``HotPath`` (reads.py) hands such requests to ``Prefixes``, which takes the
request's external prefix off the path (``/api``, after the ASGI server's ``root_path`` or
``CE_ROOT_PATH`` for a proxy that strips one), so everything inside sees the same route path
(``/v1/images``) and answers the same bytes; the prefix goes into ``scope["root_path"]``. On the way out
it puts the prefix back in front of the relative references the service sends: ``Location: /v1/images/…``
and ``Link: </v1/images?…>``. Requests without a prefix never come here (HotPath tests for one).

``Rejoin`` sits just in front of Starlette, which follows the ASGI spec's reading that ``path`` includes
``root_path``: it joins them again, so Starlette routes on the route path exactly once and builds its
own absolute URLs (trailing-slash redirects) with the prefix.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
API = "/api"


def _under(path: str, prefix: str) -> bool:
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


def normalize_root_path(raw: str) -> str:
    """``api/`` → ``/api``; empty stays empty. Raises ValueError for what cannot be a path prefix."""
    value = raw.strip().rstrip("/")
    if not value:
        return ""
    if not value.startswith("/"):
        value = "/" + value
    if any(c in value for c in "?#%\\ ") or "//" in value or any(p in (".", "..") for p in value.split("/")):
        raise ValueError(f"not a path prefix: {raw!r}")
    return value


def _prefixed(value: bytes, prefix: bytes) -> bytes:
    """``/x`` → ``PREFIX/x`` and ``</x>; rel=…`` → ``<PREFIX/x>; rel=…`` (each link of a list)."""
    if value.startswith(b"/"):
        return prefix + value
    return b", ".join(
        b"<" + prefix + link[1:] if link.startswith(b"</") else link
        for link in (part.strip() for part in value.split(b","))
    )


def split_prefix(path: str, root: str) -> tuple[int, str]:
    """(characters to take off the front of ``path``, the request's external prefix) for a request whose
    server-side prefix is ``root`` (CE_ROOT_PATH or the server's root_path, possibly empty); no prefix is
    ``(0, "")``. The same rule for both ways in (``Prefixes`` here, and the RSGI read path: rsgi.py)."""
    cut = 0  # characters taken off the front of the path (ASCII: the same count of raw_path's bytes)
    if root and _under(path, root):  # a server that keeps the prefix in the path (uvicorn --root-path)
        cut = len(root)
    if _under(path[cut:], API):
        cut, root = cut + len(API), root + API
    return cut, root


def with_prefix(headers: Any, prefix: bytes) -> Any:
    """``headers`` with ``prefix`` put in front of the relative ``Location`` and ``Link`` references
    (``headers`` itself when it has neither)."""
    if not any(name in (b"location", b"link") for name, _ in headers):
        return headers
    return [
        (name, _prefixed(value, prefix) if name in (b"location", b"link") else value)
        for name, value in headers
    ]


class Prefixes:
    """Strip the request's prefix (CE_ROOT_PATH or the server's root_path, then ``/api``) for ``app``;
    prepend it to the relative ``Location`` and ``Link`` headers ``app`` answers with."""

    def __init__(self, app: Any, root_path: str = "") -> None:
        self.app, self.root_path = app, root_path

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not (
            self.root_path or scope.get("root_path") or scope["path"].startswith(API)
        ):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        cut, root = split_prefix(path, self.root_path or (scope.get("root_path") or "").rstrip("/"))
        if not root:
            await self.app(scope, receive, send)
            return
        inner = dict(scope)
        inner["path"], inner["root_path"] = path[cut:] or "/", root
        raw = scope.get("raw_path")
        if raw is not None:
            inner["raw_path"] = raw[cut:] or b"/"
        prefix = root.encode("utf-8")

        async def send_prefixed(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                prefixed = with_prefix(headers, prefix)
                if prefixed is not headers:
                    message = dict(message)
                    message["headers"] = prefixed
            await send(message)

        await self.app(inner, receive, send_prefixed)


class Rejoin:
    """In front of Starlette: ``path`` = ``root_path`` + route path again (see the module's docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        root = scope.get("root_path")
        if root and scope["type"] == "http":
            scope = dict(scope)
            scope["path"] = root + scope["path"]
            if scope.get("raw_path") is not None:
                scope["raw_path"] = root.encode("utf-8") + scope["raw_path"]
        await self.app(scope, receive, send)
