"""The asynchronous client: ``BaseClient``'s decisions around an ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ..schemas import ImageCreateReq, ImageResp
from ._base import DEFAULT_PAGE_SIZE, BaseClient, Call, ImageId, TypeName

T = TypeVar("T")


class AsyncClient(BaseClient[httpx.AsyncClient, httpx.AsyncBaseTransport]):
    """The Images API for asyncio: the same methods and options as ``Client``, awaited.

    ``iter_images`` is an async iterator (``async for image in client.iter_images(...)``). Use it as an
    async context manager, or ``await client.aclose()``.
    """

    def _open(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def list_images(
        self, idc: str | None = None, product: str | None = None, *, limit: int | None = None
    ) -> list[ImageResp]:
        """Every image the caller may see (see ``Client.list_images``)."""
        if limit is None:
            return await self._send(self._list(idc, product))
        return [image async for image in self.iter_images(idc, product, page_size=limit)]

    async def iter_images(
        self, idc: str | None = None, product: str | None = None, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[ImageResp]:
        """The same images as ``list_images``, a page at a time, following the ``Link: rel="next"`` header."""
        url: str | None = None
        while True:
            page = await self._send(self._page(idc, product, page_size, url))
            for image in page.images:
                yield image
            if page.next_url is None:
                return
            url = page.next_url

    async def get_image(self, id: ImageId) -> ImageResp:
        return await self._send(self._get(id))

    async def create_image(
        self, spec: ImageCreateReq | Mapping[str, Any], type: TypeName | None = None
    ) -> ImageResp:
        return await self._send(self._create(spec, type))

    async def update_image(self, id: ImageId, patch: Mapping[str, Any]) -> ImageResp:
        return await self._send(self._update(id, patch))

    async def delete_image(self, id: ImageId) -> None:
        await self._send(self._delete(id))

    # ----------------------------------------------------------------------------------- plumbing

    async def _send(self, call: Call[T]) -> T:
        attempts = self._attempts(call)
        while True:
            try:
                response = await self._http.send(attempts.request)
            except httpx.TransportError as exc:
                attempts.failed(exc)
            else:
                if not attempts.retries(response):
                    return attempts.value(response)
            await asyncio.sleep(attempts.delay)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
