"""The read model: the catalog in memory, indexed, with serialized responses cached per revision.

Layout: one ``Shelf`` per namespace ("public", or an org id for that org's Customized images). Each shelf
keeps its entries sorted in list order, whole and per ``idc``, per product and per (idc, product), so a
filtered query walks only its result. A caller's visible set is the public shelf merged with its own
org's shelf; an org without Customized images shares the public responses in the cache.

List order (documented in the served OpenAPI document): ``createdAt`` ascending, then ``id`` ascending.

Freshness: the catalog knows the database revision it reflects and when that was last confirmed.
``ensure_fresh`` lets a request through while the confirmation is younger than the bound; otherwise it
refreshes from the store first and, if that fails, the request gets a 503 instead of stale data.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import heapq
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import Unavailable
from .schemas import ImageResp, ImageType, json_encoder
from .store import Changes, Store

log = logging.getLogger(__name__)

PUBLIC = "public"
SortKey = tuple[str, str]
REFRESH_TIMEOUT = 1.0  # a request waits at most this long for a refresh before answering 503
RETRY_AFTER_FAILURE = 0.25  # after a failed refresh, requests answer 503 at once for this long


@dataclass(frozen=True, slots=True)
class Entry:
    image: ImageResp
    json: bytes  # the image's serialized ImageResp, joined into list bodies as is
    key: SortKey  # (createdAt in RFC 3339 UTC, id): string order equals time order
    namespace: str


def _sort_key(entry: Entry) -> SortKey:
    return entry.key


def make_entry(image: ImageResp) -> Entry:
    namespace = PUBLIC if image.type is ImageType.PUBLIC else str(image.orgId)
    created = image.createdAt.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return Entry(
        image=image, json=json_encoder.encode(image), key=(created, str(image.id)), namespace=namespace
    )


class Shelf:
    """One namespace's entries, sorted, with indexes for every filter combination."""

    __slots__ = ("all", "by_idc", "by_idc_product", "by_product")

    def __init__(self) -> None:
        self.all: list[Entry] = []
        self.by_idc: dict[str, list[Entry]] = {}
        self.by_product: dict[str, list[Entry]] = {}
        self.by_idc_product: dict[tuple[str, str], list[Entry]] = {}

    def _lists(self, entry: Entry, create: bool) -> Iterator[list[Entry]]:
        image = entry.image
        yield self.all
        for index, key in ((self.by_idc, image.idc),):
            yield index.setdefault(key, []) if create else index.get(key, [])
        for product in image.supportedProducts:
            yield self.by_product.setdefault(product, []) if create else self.by_product.get(product, [])
            pair = (image.idc, product)
            yield self.by_idc_product.setdefault(pair, []) if create else self.by_idc_product.get(pair, [])

    def add(self, entry: Entry) -> None:
        for items in self._lists(entry, create=True):
            bisect.insort(items, entry, key=_sort_key)

    def remove(self, entry: Entry) -> None:
        for items in self._lists(entry, create=False):
            at = bisect.bisect_left(items, entry.key, key=_sort_key)
            if at < len(items) and items[at] is entry:
                del items[at]
        image = entry.image
        if not self.by_idc.get(image.idc):
            self.by_idc.pop(image.idc, None)
        for product in image.supportedProducts:
            if not self.by_product.get(product):
                self.by_product.pop(product, None)
            if not self.by_idc_product.get((image.idc, product)):
                self.by_idc_product.pop((image.idc, product), None)

    def select(self, idc: str | None, product: str | None) -> list[Entry]:
        if idc is not None and product is not None:
            return self.by_idc_product.get((idc, product), [])
        if idc is not None:
            return self.by_idc.get(idc, [])
        if product is not None:
            return self.by_product.get(product, [])
        return self.all

    def __len__(self) -> int:
        return len(self.all)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A serialized answer with its strong ETag and its response headers, built once."""

    body: bytes
    etag: bytes
    headers: list[tuple[bytes, bytes]]
    headers_304: list[tuple[bytes, bytes]]

    @classmethod
    def of(cls, body: bytes) -> Rendered:
        etag = b'"' + hashlib.blake2b(body, digest_size=16).hexdigest().encode() + b'"'
        validators = [(b"etag", etag), (b"cache-control", b"private, max-age=0")]
        return cls(
            body=body,
            etag=etag,
            headers=[
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *validators,
            ],
            headers_304=validators,
        )


def render(entries: Iterable[Entry]) -> Rendered:
    return Rendered.of(b"[" + b",".join(entry.json for entry in entries) + b"]")


class Catalog:
    def __init__(self, store: Store, *, freshness_bound: float = 1.0, cache_size: int = 4096) -> None:
        self.store = store
        self.freshness_bound = freshness_bound
        self.cache_size = cache_size
        self.revision: int | None = None
        self.confirmed_at = float("-inf")  # time.monotonic() when the revision was last confirmed
        self.failed_at = float("-inf")  # time.monotonic() of the last failed refresh
        self._entries: dict[uuid.UUID, Entry] = {}
        self._shelves: dict[str, Shelf] = {PUBLIC: Shelf()}
        self._cache: dict[tuple[str, str | None, str | None], Rendered] = {}
        self._refresh_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------ queries

    def list(self, org: str, idc: str | None, product: str | None) -> Rendered:
        """The visible images of ``org`` (canonical id text), filtered, serialized; cached per revision."""
        own = self._shelves.get(org)
        visible = org if own is not None and len(own) else PUBLIC
        cache_key = (visible, idc, product)
        rendered = self._cache.get(cache_key)
        if rendered is None:
            public = self._shelves[PUBLIC].select(idc, product)
            if visible == PUBLIC:
                rendered = render(public)
            else:
                assert own is not None
                rendered = render(heapq.merge(public, own.select(idc, product), key=_sort_key))
            if len(self._cache) >= self.cache_size:
                if self.cache_size == 0:
                    return rendered
                del self._cache[next(iter(self._cache))]
            self._cache[cache_key] = rendered
        return rendered

    def get(self, image_id: uuid.UUID) -> Entry | None:
        """The image with this id, visible or not: the caller's handler applies ``visibility``."""
        return self._entries.get(image_id)

    def __len__(self) -> int:
        return len(self._entries)

    def count_by_type(self) -> dict[str, int]:
        public = len(self._shelves[PUBLIC])
        return {ImageType.PUBLIC.value: public, ImageType.CUSTOMIZED.value: len(self._entries) - public}

    # ---------------------------------------------------------------------------------- freshness

    def is_fresh(self) -> bool:
        return time.monotonic() - self.confirmed_at <= self.freshness_bound

    async def ensure_fresh(self) -> None:
        """Return when the read model is confirmed fresh; raise ``Unavailable`` when that can't be done."""
        now = time.monotonic()
        if now - self.confirmed_at <= self.freshness_bound:
            return
        if now - self.failed_at < RETRY_AFTER_FAILURE:
            raise Unavailable()  # the database failed a moment ago: answer at once, don't queue
        try:
            await asyncio.wait_for(self.refresh(only_if_stale=True), timeout=REFRESH_TIMEOUT)
        except Exception as exc:  # any failure to confirm freshness: never serve unbounded-stale data
            log.warning("catalog refresh failed: %s", exc.__class__.__name__)
            raise Unavailable() from None

    async def refresh(self, *, only_if_stale: bool = False) -> None:
        """Bring the read model up to the database's current revision (one refresh at a time)."""
        async with self._refresh_lock:
            if only_if_stale and self.is_fresh():  # another request refreshed while we waited
                return
            started = time.monotonic()
            try:
                changes = await self.store.changes_since(self.revision)
            except BaseException:
                self.failed_at = time.monotonic()
                raise
            self.apply(changes)
            self.confirmed_at = started

    def apply(self, changes: Changes) -> None:
        if changes.full:
            self._entries.clear()
            self._shelves = {PUBLIC: Shelf()}
        if changes.revision == self.revision and not changes.full:
            return
        for image_id in changes.deleted:
            self._discard(image_id)
        for image in changes.upserted:
            self._discard(image.id)
            entry = make_entry(image)
            self._entries[image.id] = entry
            shelf = self._shelves.get(entry.namespace)
            if shelf is None:
                shelf = self._shelves[entry.namespace] = Shelf()
            shelf.add(entry)
        self.revision = changes.revision
        self._cache = {}

    def _discard(self, image_id: uuid.UUID) -> None:
        entry = self._entries.pop(image_id, None)
        if entry is None:
            return
        shelf = self._shelves[entry.namespace]
        shelf.remove(entry)
        if entry.namespace != PUBLIC and not len(shelf):
            del self._shelves[entry.namespace]

    async def poll_forever(self, interval: float) -> None:
        """Background task: keep the read model fresh so requests never wait on the database."""
        failing = False
        while True:
            try:
                await asyncio.wait_for(self.refresh(), timeout=REFRESH_TIMEOUT * 2)
                if failing:
                    log.info("catalog refresh recovered at revision %s", self.revision)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # log the first failure of an outage, not one line per poll
                    log.warning("catalog refresh failing: %s: %s", exc.__class__.__name__, exc)
                failing = True
            await asyncio.sleep(interval)

    async def listen_forever(self) -> None:
        """Background task (PostgreSQL): refresh as soon as any process commits a change."""
        while True:
            try:
                async for _revision in self.store.notifications():
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poller covers freshness meanwhile; reconnect shortly
                log.debug("catalog listener reconnecting: %s: %s", exc.__class__.__name__, exc)
            await asyncio.sleep(1.0)
