"""What the sync and async clients share: configuration, request building, retry decisions, the
conditional-GET cache, and turning responses into values or errors. No I/O happens here, so
``_sync.py`` and ``_async.py`` are only the send-and-sleep loop.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import os
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from ..schemas import Error, ErrorStatusMessage, ImageCreateReq, ImageResp, ImageType
from .errors import (
    AuthError,
    ClusterEngineError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    TransportError,
    ValidationError,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_PAGE_SIZE = 100
IMAGES = "/v1/images"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_TRANSPORT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# httpcore's words when a (pooled) connection is closed by the server before any byte of a response
CLOSED_BEFORE_RESPONSE = "Server disconnected without sending a response"
CACHE_ENTRIES = 512

ImageId = uuid.UUID | str
TypeName = ImageType | Literal["Public", "Customized"]

_image = msgspec.json.Decoder(ImageResp)
_images = msgspec.json.Decoder(list[ImageResp])
_status_message = msgspec.json.Decoder(ErrorStatusMessage)
_error = msgspec.json.Decoder(Error)
_ERRORS: dict[int, type[ClusterEngineError]] = {
    400: ValidationError,
    401: AuthError,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
}


@dataclasses.dataclass(frozen=True)
class Retry:
    """When and how long to wait before trying an idempotent call again.

    Only idempotent methods (GET, DELETE, …; never POST or PATCH) are retried, and only after a 503 or a
    connection failure / timeout. The n-th wait (n from 0) is ``backoff * 2**n`` with jitter, at least the
    server's ``Retry-After``, and never more than ``max_delay`` seconds; except that a first failure where
    the server closed the connection before any byte of a response (a pooled keep-alive connection it had
    just closed) is tried again at once, on a new connection.

    POST and PATCH are not retried even then: the request may have reached the server and been applied
    (a worker that died before answering looks the same to the client), and a create sent twice answers
    409 the second time. Such a failure raises ``TransportError`` saying it may have been applied.
    """

    total: int = 3
    backoff: float = 0.5
    max_delay: float = 10.0
    # Called before each wait with (seconds, why): e.g. the CLI's "retrying in 1.2 s…" on a terminal.
    on_retry: Callable[[float, str], None] | None = None

    def waiting(self, delay: float, response: httpx.Response | None, error: Exception | None) -> None:
        """Tell ``on_retry`` (if any) about a wait of ``delay`` seconds (an immediate retry is not told)."""
        if self.on_retry is None or delay <= 0:
            return
        why = f"{response.status_code}" if response is not None else error.__class__.__name__
        self.on_retry(delay, why)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        exponential = self.backoff * 2.0**attempt * random.uniform(0.5, 1.0)
        return min(self.max_delay, max(exponential, retry_after or 0.0))


@dataclasses.dataclass(frozen=True)
class Call(Generic[T]):
    """One API operation: what to send, and how to read a successful response."""

    method: str
    url: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str | int] | None = None
    content: bytes | None = None
    content_type: str | None = None

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of ``GET /v1/images`` and the URL of the next one (from its ``Link`` header)."""

    images: list[ImageResp]
    next_url: str | None


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def error_for(response: httpx.Response) -> ClusterEngineError:
    """The SDK error for an unsuccessful response, with the contract body decoded onto it."""
    status = response.status_code
    body: ErrorStatusMessage | Error | None
    try:
        body = (
            _status_message.decode(response.content)
            if status in (400, 401)
            else _error.decode(response.content)
        )
    except msgspec.DecodeError:
        body = None
    if isinstance(body, ErrorStatusMessage) and body.message:
        message = body.message
    elif isinstance(body, Error):
        message = body.reason
    else:
        message = f"HTTP {status} {response.reason_phrase}".strip()
    if status == 503:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return ServiceUnavailable(message, body=body, response=response, retry_after=retry_after)
    kind = _ERRORS.get(status, ServerError if status >= 500 else ClusterEngineError)
    if kind in (ValidationError, AuthError) and not isinstance(body, ErrorStatusMessage):
        body = None
    return kind(message, status=status, body=body, response=response)


def closed_before_response(error: httpx.TransportError) -> bool:
    """The server closed the connection before sending any byte of a response."""
    return isinstance(error, httpx.RemoteProtocolError) and str(error).startswith(CLOSED_BEFORE_RESPONSE)


def transport_error(exc: httpx.TransportError) -> TransportError:
    try:
        where = f"{exc.request.method} {exc.request.url}: "
        idempotent = exc.request.method in IDEMPOTENT_METHODS
    except RuntimeError:  # no request attached
        where, idempotent = "", True
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
    detail = str(exc) or type(exc).__name__
    if not idempotent:
        detail += " (not retried: the server may have applied it; check before sending it again)"
    return TransportError(f"{where}{what}: {detail}")


def _decoded(decoder: msgspec.json.Decoder[T], response: httpx.Response) -> T:
    try:
        return decoder.decode(response.content)
    except msgspec.DecodeError as exc:
        raise ClusterEngineError(
            f"unexpected response body from {response.request.method} {response.request.url}: {exc}",
            status=response.status_code,
            response=response,
        ) from None


def read_image(response: httpx.Response) -> ImageResp:
    return _decoded(_image, response)


def read_images(response: httpx.Response) -> list[ImageResp]:
    return _decoded(_images, response)


def read_page(response: httpx.Response) -> Page:
    following = response.links.get("next", {}).get("url")
    return Page(_decoded(_images, response), following or None)


def read_nothing(_response: httpx.Response) -> None:
    return None


def _item(image_id: ImageId) -> str:
    return f"{IMAGES}/{quote(str(image_id), safe='')}"


def _filters(idc: str | None, product: str | None, limit: int | None = None) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if idc is not None:
        params["idc"] = idc
    if product is not None:
        params["product"] = product
    if limit is not None:
        params["limit"] = limit
    return params


def _version() -> str:
    try:
        return metadata.version("cluster-engine")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


class ConditionalCache:
    """ETag and body of the last 200 per URL (bounded, least recently used out), for ``If-None-Match``."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[str, httpx.Response]] = OrderedDict()

    def etag(self, url: str) -> str | None:
        entry = self._entries.get(url)
        return entry[0] if entry else None

    def store(self, url: str, response: httpx.Response) -> None:
        etag = response.headers.get("ETag")
        if etag:
            self._entries[url] = (etag, response)
            self._entries.move_to_end(url)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def replay(self, url: str) -> httpx.Response | None:
        entry = self._entries.get(url)
        if entry is None:
            return None
        self._entries.move_to_end(url)
        return entry[1]


class BaseClient:
    """Configuration and every decision that does not need I/O; subclasses own the httpx client."""

    def __init__(
        self,
        base_url: str | None,
        token: str | None,
        *,
        timeout: float | httpx.Timeout,
        retries: int | Retry,
        cache: bool,
    ) -> None:
        base_url = base_url if base_url is not None else os.environ.get("CE_URL")
        token = token if token is not None else os.environ.get("CE_TOKEN")
        if not base_url:
            raise ValueError("no server URL: pass base_url or set CE_URL")
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a valid server URL: {base_url!r} ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"the server URL must be http(s)://HOST[:PORT][/PATH], not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.retry = retries if isinstance(retries, Retry) else Retry(total=retries)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.headers = {"User-Agent": f"cluster-engine-python/{_version()}", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.cache = ConditionalCache() if cache else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # ---------------------------------------------------------------------------------- operations

    @staticmethod
    def _list(idc: str | None, product: str | None) -> Call[list[ImageResp]]:
        return Call("GET", IMAGES, read_images, params=_filters(idc, product))

    @staticmethod
    def _page(idc: str | None, product: str | None, page_size: int, url: str | None) -> Call[Page]:
        if url is not None:  # the server's Link already carries the filters, the limit and the cursor
            return Call("GET", url, read_page)
        return Call("GET", IMAGES, read_page, params=_filters(idc, product, page_size))

    @staticmethod
    def _get(image_id: ImageId) -> Call[ImageResp]:
        return Call("GET", _item(image_id), read_image)

    @staticmethod
    def _create(spec: ImageCreateReq | Mapping[str, Any], type: TypeName | None) -> Call[ImageResp]:
        if isinstance(spec, ImageCreateReq):
            body: dict[str, Any] = msgspec.to_builtins(spec)
        elif isinstance(spec, Mapping):
            body = dict(spec)
        else:
            raise TypeError(f"spec must be an ImageCreateReq or a mapping, not {spec.__class__.__name__}")
        if type is not None:
            body["type"] = str(type)
        return Call(
            "POST", IMAGES, read_image, content=msgspec.json.encode(body), content_type="application/json"
        )

    @staticmethod
    def _update(image_id: ImageId, patch: Mapping[str, Any]) -> Call[ImageResp]:
        content = msgspec.json.encode(dict(patch))
        return Call(
            "PATCH", _item(image_id), read_image, content=content, content_type="application/merge-patch+json"
        )

    @staticmethod
    def _delete(image_id: ImageId) -> Call[None]:
        return Call("DELETE", _item(image_id), read_nothing)

    # --------------------------------------------------------------------------- send and receive

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        headers = {"Content-Type": call.content_type} if call.content_type else None
        request = http.build_request(
            call.method, call.url, params=call.params, content=call.content, headers=headers
        )
        if self.cache is not None and call.method == "GET":
            etag = self.cache.etag(str(request.url))
            if etag:
                request.headers["If-None-Match"] = etag
        return request

    def _retry_delay(
        self,
        call: Call[Any],
        attempt: int,
        response: httpx.Response | None = None,
        error: httpx.TransportError | None = None,
    ) -> float | None:
        """Seconds to wait before trying ``call`` again, or None to stop here (``Retry.on_retry`` is told)."""
        delay = self._next_delay(call, attempt, response, error)
        if delay is not None:
            self.retry.waiting(delay, response, error)
        return delay

    def _next_delay(
        self,
        call: Call[Any],
        attempt: int,
        response: httpx.Response | None,
        error: httpx.TransportError | None,
    ) -> float | None:
        if attempt >= self.retry.total or not call.idempotent:
            return None
        if error is not None:
            if attempt == 0 and closed_before_response(error):
                return 0.0  # a stale pooled connection: the next attempt opens a new one
            return self.retry.delay(attempt) if isinstance(error, RETRYABLE_TRANSPORT_ERRORS) else None
        if response is not None and response.status_code == 503:
            return self.retry.delay(attempt, parse_retry_after(response.headers.get("Retry-After")))
        return None

    def _finish(self, call: Call[T], request: httpx.Request, response: httpx.Response) -> T:
        """The value of a final response, or the SDK error it stands for."""
        url = str(request.url)
        if response.status_code == 304 and self.cache is not None:
            cached = self.cache.replay(url)
            if cached is not None:
                return call.parse(cached)
        if not response.is_success:
            raise error_for(response)
        if self.cache is not None and call.method == "GET":
            self.cache.store(url, response)
        return call.parse(response)
