"""What the sync and async clients share: the constructor and configuration, request building, retry
decisions (``Attempts``), and (through ``_responses``) turning responses into values or errors. No I/O
happens here, so ``_sync.py`` and ``_async.py`` are only the methods' signatures and the send-and-wait loop.
"""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from ..schemas import ImageCreateReq, ImageResp, ImageType
from . import errors
from ._responses import (
    ConditionalCache,
    Page,
    error_for,
    parse_retry_after,
    read_image,
    read_images,
    read_nothing,
    read_page,
)

T = TypeVar("T")
HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)

DEFAULT_TIMEOUT = 10.0
DEFAULT_PAGE_SIZE = 100
IMAGES = "/v1/images"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRYABLE_TRANSPORT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# httpcore's words when a (pooled) connection is closed by the server before any byte of a response
CLOSED_BEFORE_RESPONSE = "Server disconnected without sending a response"

ImageId = uuid.UUID | str
TypeName = ImageType | Literal["Public", "Customized"]


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


def closed_before_response(error: httpx.TransportError) -> bool:
    """The server closed the connection before sending any byte of a response."""
    return isinstance(error, httpx.RemoteProtocolError) and str(error).startswith(CLOSED_BEFORE_RESPONSE)


def transport_error(exc: httpx.TransportError) -> errors.TransportError:
    try:
        where = f"{exc.request.method} {exc.request.url}: "
        idempotent = exc.request.method in IDEMPOTENT_METHODS
    except RuntimeError:  # no request attached
        where, idempotent = "", True
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
    detail = str(exc) or type(exc).__name__
    if not idempotent:
        detail += " (not retried: the server may have applied it; check before sending it again)"
    return errors.TransportError(f"{where}{what}: {detail}")


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


class BaseClient(Generic[HttpT, TransportT]):
    """Configuration and every decision that does not need I/O; subclasses open the httpx client
    (``_open``) and run the send-and-wait loop around ``Attempts``."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int | Retry = 3,
        cache: bool = False,
        transport: TransportT | None = None,
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
        self._http: HttpT = self._open(transport)

    def _open(self, transport: TransportT | None) -> HttpT:
        """The httpx client (sync or async) for ``base_url``, ``headers`` and ``timeout``."""
        raise NotImplementedError

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

    def _attempts(self, call: Call[T]) -> Attempts[T]:
        return Attempts(self, call)

    def _request(self, call: Call[Any]) -> httpx.Request:
        headers = {"Content-Type": call.content_type} if call.content_type else None
        request = self._http.build_request(
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


class Attempts(Generic[T]):
    """One call through its retries, without I/O. The clients' loops send ``request``, hand a transport
    failure to ``failed`` and a response to ``retries``, and while the call goes on wait ``delay`` seconds.

    A response is read and closed by the time ``send`` returns it (no streaming), so one that is retried
    needs no closing.
    """

    def __init__(self, client: BaseClient[Any, Any], call: Call[T]) -> None:
        self.client = client
        self.call = call
        self.attempt = 0
        self.delay = 0.0
        self.request = client._request(call)

    def failed(self, error: httpx.TransportError) -> None:
        """Plan the next attempt after a connection failure or timeout, or raise ``TransportError``."""
        delay = self.client._retry_delay(self.call, self.attempt, error=error)
        if delay is None:
            raise transport_error(error) from error
        self._again(delay)

    def retries(self, response: httpx.Response) -> bool:
        """Whether the call goes on after ``response`` (then the next attempt is planned)."""
        delay = self.client._retry_delay(self.call, self.attempt, response=response)
        if delay is None:
            return False
        self._again(delay)
        return True

    def value(self, response: httpx.Response) -> T:
        """The final response's value, or the SDK error it stands for (raised)."""
        return self.client._finish(self.call, self.request, response)

    def _again(self, delay: float) -> None:
        self.attempt += 1
        self.delay = delay
        self.request = self.client._request(self.call)
