"""Reading responses: the decoded value of a success, the SDK error of a failure (with the contract body
on it), ``Retry-After``, and the ETag cache behind ``cache=True``. No I/O happens here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
from collections import OrderedDict
from typing import TypeVar

import httpx
import msgspec

from ..schemas import Error, ErrorStatusMessage, ImageResp
from . import errors

T = TypeVar("T")

CACHE_ENTRIES = 512

_image = msgspec.json.Decoder(ImageResp)
_images = msgspec.json.Decoder(list[ImageResp])
_status_message = msgspec.json.Decoder(ErrorStatusMessage)
_error = msgspec.json.Decoder(Error)
_ERRORS: dict[int, type[errors.ClusterEngineError]] = {
    400: errors.ValidationError,
    401: errors.AuthError,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
}


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


def error_for(response: httpx.Response) -> errors.ClusterEngineError:
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
        return errors.ServiceUnavailable(message, body=body, response=response, retry_after=retry_after)
    kind = _ERRORS.get(status, errors.ServerError if status >= 500 else errors.ClusterEngineError)
    if kind in (errors.ValidationError, errors.AuthError) and not isinstance(body, ErrorStatusMessage):
        body = None
    return kind(message, status=status, body=body, response=response)


def _decoded(decoder: msgspec.json.Decoder[T], response: httpx.Response) -> T:
    try:
        return decoder.decode(response.content)
    except msgspec.DecodeError as exc:
        raise errors.ClusterEngineError(
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
