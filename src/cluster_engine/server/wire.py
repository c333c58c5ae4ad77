"""The HTTP wire facts in one place: routes, content type, cache control, ETags, the next-page link, and the
one renderer of errors that both stacks (the raw ASGI read path and Starlette) answer with.

Nothing here knows the read model or the store: it turns bytes and ``ApiError`` values into answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

import xxhash
from starlette.responses import Response

from .errors import INTERNAL_ERROR_BODY, ApiError
from .validation import ListQuery, encode_cursor

LIST_PATH = "/v1/images"
ITEM_PREFIX = "/v1/images/"
ITEM_ROUTE = "/v1/images/{id}"
JSON = b"application/json"
JSON_TYPE = JSON.decode()
CACHE_CONTROL = b"private, max-age=0"

Headers = list[tuple[bytes, bytes]]
StrHeaders = list[tuple[str, str]]


class Prebuilt(list[tuple[bytes, bytes]]):
    """The header list of a cached answer, built once. ``text`` is the same headers as ``str`` pairs (what
    RSGI takes), filled on first use: it lives and dies with the answer, where a table of conversions
    kept apart would keep every header list it saw alive."""

    __slots__ = ("text",)

    def __init__(self, headers: Headers) -> None:
        super().__init__(headers)
        self.text: StrHeaders | None = None


Answer = tuple[int, Headers, bytes]  # status, headers, body


def etag_of(body: bytes) -> bytes:
    """The strong ETag of a body: 128 bits of XXH3, equal for equal bytes on every worker and replica.
    Not a cryptographic hash, and it needs not be one (answers are only ever compared with answers of the
    same caller's own view); blake2b cost 75 µs for a 19 kB list here, XXH3 0.65 µs."""
    return b'"' + xxhash.xxh3_128_hexdigest(body).encode() + b'"'


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


@dataclass(frozen=True, slots=True)
class Rendered:
    """A serialized answer with its strong ETag and its response headers, built once."""

    body: bytes
    etag: bytes
    headers: Headers
    headers_304: Headers

    @classmethod
    def of(cls, body: bytes, link: bytes | None = None) -> Rendered:
        etag = etag_of(body)
        validators = [(b"etag", etag), (b"cache-control", CACHE_CONTROL)]
        if link is not None:
            validators.append((b"link", link))
        return cls(
            body=body,
            etag=etag,
            headers=Prebuilt(
                [(b"content-type", JSON), (b"content-length", str(len(body)).encode()), *validators]
            ),
            headers_304=Prebuilt(validators),
        )

    def answer(self, if_none_match: bytes | None) -> Answer:
        """200 with the body, or 304 with the validators when ``if_none_match`` matches the ETag."""
        if if_none_match is not None and etag_matches(if_none_match, self.etag):
            return 304, self.headers_304, b""
        return 200, self.headers, self.body


def next_link(query: ListQuery, last: tuple[str, str]) -> bytes:
    """The ``Link: <…>; rel="next"`` value of a page whose last image has the sort key ``last``."""
    params = {"idc": query.idc, "product": query.product, "limit": query.limit, "cursor": encode_cursor(last)}
    target = LIST_PATH + "?" + urlencode({k: v for k, v in params.items() if v is not None})
    return f'<{target}>; rel="next"'.encode()


def _json_headers(body: bytes) -> Headers:
    return [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]


def error_answer(error: ApiError) -> Answer:
    """The contract's answer to ``error``: its status, its body and its headers."""
    body = error.body()
    headers = _json_headers(body)
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers().items()]
    return error.status, headers, body


INTERNAL_ERROR_ANSWER: Answer = (500, _json_headers(INTERNAL_ERROR_BODY), INTERNAL_ERROR_BODY)


def response(answer: Answer) -> Response:
    """An answer as a Starlette response (the headers exactly as the raw read path sends them)."""
    status, headers, body = answer
    built = Response(body, status_code=status)
    built.raw_headers = list(headers)
    return built


def error_response(error: ApiError) -> Response:
    return response(error_answer(error))
