"""The synchronous client: ``BaseClient``'s decisions around an ``httpx.Client``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ..schemas import ImageCreateReq, ImageResp
from ._base import DEFAULT_PAGE_SIZE, BaseClient, Call, ImageId, TypeName

T = TypeVar("T")


class Client(BaseClient[httpx.Client, httpx.BaseTransport]):
    """The Images API, synchronously.

    ``base_url`` and ``token`` default to ``$CE_URL`` and ``$CE_TOKEN`` (read only when the argument is
    None). Every call has a timeout; idempotent calls are retried on 503 and connection failures
    (``retries``: a count or a ``Retry``); ``cache=True`` revalidates GETs with ``If-None-Match``.
    ``transport`` replaces the network (``httpx.MockTransport`` in tests). Use it as a context manager,
    or call ``close()``.
    """

    def _open(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def list_images(
        self, idc: str | None = None, product: str | None = None, *, limit: int | None = None
    ) -> list[ImageResp]:
        """Every image the caller may see, filtered by ``idc`` and/or ``product``, in the server's order.

        One request, unless ``limit`` is given: then pages of ``limit`` images are fetched and joined.
        """
        if limit is None:
            return self._send(self._list(idc, product))
        return list(self.iter_images(idc, product, page_size=limit))

    def iter_images(
        self, idc: str | None = None, product: str | None = None, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[ImageResp]:
        """The same images as ``list_images``, a page at a time, following the ``Link: rel="next"`` header."""
        url: str | None = None
        while True:
            page = self._send(self._page(idc, product, page_size, url))
            yield from page.images
            if page.next_url is None:
                return
            url = page.next_url

    def get_image(self, id: ImageId) -> ImageResp:
        """One image by id; ``NotFound`` when it is missing or not visible to the caller."""
        return self._send(self._get(id))

    def create_image(
        self, spec: ImageCreateReq | Mapping[str, Any], type: TypeName | None = None
    ) -> ImageResp:
        """Register an image (``type`` defaults to the server's default, Customized). Never retried."""
        return self._send(self._create(spec, type))

    def update_image(self, id: ImageId, patch: Mapping[str, Any]) -> ImageResp:
        """Apply a JSON merge patch to an image's mutable fields. Never retried."""
        return self._send(self._update(id, patch))

    def delete_image(self, id: ImageId) -> None:
        """Delete an image."""
        self._send(self._delete(id))

    # ----------------------------------------------------------------------------------- plumbing

    def _send(self, call: Call[T]) -> T:
        attempts = self._attempts(call)
        while True:
            try:
                response = self._http.send(attempts.request)
            except httpx.TransportError as exc:
                attempts.failed(exc)
            else:
                if not attempts.retries(response):
                    return attempts.value(response)
            time.sleep(attempts.delay)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
