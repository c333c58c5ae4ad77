"""The read model: the catalog in memory, indexed, with serialized responses cached per revision.

Layout: one ``Shelf`` per namespace ("public", or an org id for that org's Customized images). Each shelf
keeps its entries sorted in list order, whole and per ``idc``, per product and per (idc, product), so a
filtered query walks only its result. A caller's visible set is the public shelf merged with its own
org's shelf; an org without Customized images shares the public responses in the cache.

Memory stays bounded however many orgs there are: the Public shelf is always held, org shelves are held
for recently seen orgs only (least recently used go first, past ``max_images`` Customized images or
``max_orgs`` orgs, known-empty orgs included) and loaded from indexed SQL on first use.

List order (documented in the served OpenAPI document): ``createdAt`` ascending, then ``id`` ascending.

Freshness: the catalog knows the database revision it reflects and when that was last confirmed.
``ensure_fresh`` lets a request through while the confirmation is younger than the bound; otherwise it
refreshes from the store first and, if that fails, the request gets a 503 instead of stale data.
Changes are applied idempotently (each entry remembers the revision that wrote it, and older news is
ignored), which is what lets org loads and change polling interleave safely.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import heapq
import itertools
import logging
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

from .deadline import within
from .errors import Unavailable
from .schemas import ImageResp, ImageType, json_encoder
from .store import Changes, Store
from .validation import ListQuery, encode_cursor

log = logging.getLogger(__name__)

PUBLIC = "public"
SortKey = tuple[str, str]
REFRESH_TIMEOUT = 1.0  # a request waits at most this long for the database before answering 503
RETRY_AFTER_FAILURE = 0.25  # after a failed refresh, requests answer 503 at once for this long


@dataclass(frozen=True, slots=True)
class Entry:
    id: uuid.UUID
    json: bytes  # the image's serialized ImageResp, joined into list bodies as is
    key: SortKey  # (createdAt in RFC 3339 UTC, id): string order equals time order
    namespace: str  # "public", or the owner org's id
    idc: str
    products: tuple[str, ...]
    revision: int  # the catalog revision that wrote this state of the image


def _sort_key(entry: Entry) -> SortKey:
    return entry.key


def make_entry(image: ImageResp, revision: int) -> Entry:
    intern = sys.intern
    namespace = PUBLIC if image.type is ImageType.PUBLIC else intern(str(image.orgId))
    # isoformat pads the year to four digits (strftime's %Y doesn't, so year 999 would sort last)
    created = image.createdAt.replace(tzinfo=None).isoformat(timespec="microseconds")
    return Entry(
        id=image.id,
        json=json_encoder.encode(image),
        key=(created, str(image.id)),
        namespace=namespace,
        idc=intern(image.idc),
        products=tuple(intern(p) for p in image.supportedProducts),
        revision=revision,
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
        yield self.all
        yield self.by_idc.setdefault(entry.idc, []) if create else self.by_idc.get(entry.idc, [])
        for product in entry.products:
            yield self.by_product.setdefault(product, []) if create else self.by_product.get(product, [])
            pair = (entry.idc, product)
            yield self.by_idc_product.setdefault(pair, []) if create else self.by_idc_product.get(pair, [])

    def add(self, entry: Entry) -> None:
        for items in self._lists(entry, create=True):
            bisect.insort(items, entry, key=_sort_key)

    def remove(self, entry: Entry) -> None:
        for items in self._lists(entry, create=False):
            at = bisect.bisect_left(items, entry.key, key=_sort_key)
            if at < len(items) and items[at] is entry:
                del items[at]
        if not self.by_idc.get(entry.idc):
            self.by_idc.pop(entry.idc, None)
        for product in entry.products:
            if not self.by_product.get(product):
                self.by_product.pop(product, None)
            if not self.by_idc_product.get((entry.idc, product)):
                self.by_idc_product.pop((entry.idc, product), None)

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
    def of(cls, body: bytes, link: bytes | None = None) -> Rendered:
        etag = b'"' + hashlib.blake2b(body, digest_size=16).hexdigest().encode() + b'"'
        validators = [(b"etag", etag), (b"cache-control", b"private, max-age=0")]
        if link is not None:
            validators.append((b"link", link))
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


def render(entries: Iterable[Entry], link: bytes | None = None) -> Rendered:
    return Rendered.of(b"[" + b",".join(entry.json for entry in entries) + b"]", link)


def next_link(query: ListQuery, last: SortKey) -> bytes:
    params = {"idc": query.idc, "product": query.product, "limit": query.limit, "cursor": encode_cursor(last)}
    target = "/v1/images?" + urlencode({k: v for k, v in params.items() if v is not None})
    return f'<{target}>; rel="next"'.encode()


class Catalog:
    def __init__(
        self,
        store: Store,
        *,
        freshness_bound: float = 1.0,
        cache_size: int = 4096,
        max_images: int = 200_000,
        max_orgs: int = 100_000,
    ) -> None:
        self.store = store
        self.freshness_bound = freshness_bound
        self.cache_size = cache_size
        self.max_images = max_images  # Customized images held in memory, at most
        self.max_orgs = max_orgs  # org shelves (empty ones included) held in memory, at most
        self.revision: int | None = None  # the database revision this read model reflects
        self.confirmed_at = float("-inf")  # time.monotonic() when the revision was last confirmed
        self.failed_at = float("-inf")  # time.monotonic() of the last failed refresh
        self._cursor: int | None = None  # changes are fetched from here (may rewind below revision)
        self._rewind: int | None = None  # lowest rewind asked for by org loads during a fetch
        self._entries: dict[uuid.UUID, Entry] = {}
        self._public = Shelf()
        self._orgs: OrderedDict[str, Shelf] = OrderedDict()
        self._org_images = 0
        self._loading: dict[str, asyncio.Future[Shelf]] = {}
        self._cache: dict[tuple[str, str | None, str | None], Rendered] = {}
        self._pages: dict[tuple[str, ListQuery], Rendered] = {}
        self._items: dict[uuid.UUID, Rendered] = {}
        self._refresh_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self.on_refresh_failure: Callable[[], None] | None = None  # e.g. a metrics hook

    # ------------------------------------------------------------------------------------ queries

    def org_shelf(self, org: str) -> Shelf | None:
        """The org's shelf if it is held (marking it recently used), else None: see ``load_org``."""
        shelf = self._orgs.get(org)
        if shelf is not None:
            self._orgs.move_to_end(org)
        return shelf

    def list_images(self, org: str, own: Shelf, idc: str | None, product: str | None) -> Rendered:
        """The images ``org`` may see (Public + ``own``), filtered, serialized; cached per revision."""
        visible = org if len(own) else PUBLIC
        cache_key = (visible, idc, product)
        rendered = self._cache.get(cache_key)
        if rendered is None:
            public = self._public.select(idc, product)
            if visible == PUBLIC:
                rendered = render(public)
            else:
                rendered = render(heapq.merge(public, own.select(idc, product), key=_sort_key))
            if self.cache_size:
                if len(self._cache) >= self.cache_size:
                    del self._cache[next(iter(self._cache))]
                self._cache[cache_key] = rendered
        return rendered

    def page(self, org: str, own: Shelf, query: ListQuery) -> Rendered:
        """One page of ``list_images``: up to ``query.limit`` images after ``query.after``, with a
        ``Link: <…>; rel="next"`` header when more follow."""
        visible = org if len(own) else PUBLIC
        cache_key = (visible, query)
        rendered = self._pages.get(cache_key)
        if rendered is None:
            sources = [self._public.select(query.idc, query.product)]
            if visible != PUBLIC:
                sources.append(own.select(query.idc, query.product))
            if query.after is not None:
                sources = [s[bisect.bisect_right(s, query.after, key=_sort_key) :] for s in sources]
            merged = heapq.merge(*sources, key=_sort_key) if len(sources) > 1 else iter(sources[0])
            limit = query.limit or len(self._entries) + 1
            entries = list(itertools.islice(merged, limit + 1))
            link = None
            if len(entries) > limit:
                del entries[limit:]
                link = next_link(query, entries[-1].key)
            rendered = render(entries, link)
            if self.cache_size:
                if len(self._pages) >= self.cache_size:
                    del self._pages[next(iter(self._pages))]
                self._pages[cache_key] = rendered
        return rendered

    def item(self, entry: Entry) -> Rendered:
        """One image's answer (body, ETag, headers), built once per state of the image."""
        rendered = self._items.get(entry.id)
        if rendered is None or rendered.body is not entry.json:  # a new state of the image: rebuild
            rendered = Rendered.of(entry.json)
            if self.cache_size:
                if len(self._items) >= self.cache_size * 16:
                    del self._items[next(iter(self._items))]
                self._items[entry.id] = rendered
        return rendered

    def get(self, image_id: uuid.UUID) -> Entry | None:
        """The image if it is held: every Public image, and the Customized images of held orgs."""
        return self._entries.get(image_id)

    def __len__(self) -> int:
        return len(self._entries)

    def held(self) -> dict[str, int]:
        """What is in memory now: images by type, and org shelves."""
        return {
            ImageType.PUBLIC.value: len(self._public),
            ImageType.CUSTOMIZED.value: self._org_images,
            "orgs": len(self._orgs),
        }

    # ----------------------------------------------------------------------------------- org shelves

    async def load_org(self, org: str) -> Shelf:
        """Hold the org's shelf, loading it from the database (once, however many requests ask)."""
        shelf = self.org_shelf(org)
        if shelf is not None:
            return shelf
        pending = self._loading.get(org)
        if pending is None:
            pending = self._loading[org] = asyncio.get_running_loop().create_future()
            try:
                namespace = await within(self.store.load_namespace(org), REFRESH_TIMEOUT)
            except Exception as exc:
                del self._loading[org]
                pending.set_exception(Unavailable())
                pending.exception()  # retrieved: waiters get it via await
                log.warning("loading org %s failed: %s", org, exc.__class__.__name__)
                raise Unavailable() from None
            shelf = self._hold(org, namespace.images, namespace.revision)
            del self._loading[org]
            pending.set_result(shelf)
            return shelf
        return await asyncio.shield(pending)

    def _hold(self, org: str, images: list[tuple[ImageResp, int]], revision: int) -> Shelf:
        shelf = self._orgs.get(org)
        if shelf is None:
            shelf = self._orgs[org] = Shelf()
        for image, image_revision in images:
            self._upsert(image, image_revision)
        if self._cursor is None or revision < self._cursor:
            # Changes between `revision` and the cursor may have been skipped while this org was not
            # held; fetching them again is harmless (applying is idempotent) and closes the gap. A fetch
            # already under way must not move the cursor past this point when it lands: `_rewind`.
            if self._cursor is not None:
                self._cursor = revision
            self._rewind = revision if self._rewind is None else min(self._rewind, revision)
        self._evict(keep=org)
        return shelf

    def _evict(self, keep: str) -> None:
        while (self._org_images > self.max_images or len(self._orgs) > self.max_orgs) and len(self._orgs) > 1:
            org, shelf = next(iter(self._orgs.items()))
            if org == keep:
                self._orgs.move_to_end(org)
                continue
            del self._orgs[org]
            for entry in shelf.all:
                del self._entries[entry.id]
            self._org_images -= len(shelf)

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
            await within(self._refreshing(only_if_stale=True), REFRESH_TIMEOUT)
        except Exception as exc:  # any failure to confirm freshness: never serve unbounded-stale data
            if isinstance(exc, TimeoutError):  # the refresh goes on; meanwhile answer at once
                self.failed_at = time.monotonic()
            log.warning("catalog refresh failed: %s", exc.__class__.__name__)
            raise Unavailable() from None

    def _refreshing(self, *, only_if_stale: bool = False) -> asyncio.Task[None]:
        """The refresh in progress, or a new one: requests and the poller wait for the same one, and
        a refresh that outlives their deadlines is never cancelled (see deadline.py)."""
        task = self._refresh_task
        if task is None or task.done():
            task = self._refresh_task = asyncio.create_task(self.refresh(only_if_stale=only_if_stale))
        return task

    async def refresh(self, *, only_if_stale: bool = False) -> None:
        """Bring the read model up to the database's current revision (one refresh at a time)."""
        async with self._refresh_lock:
            if only_if_stale and self.is_fresh():  # another request refreshed while we waited
                return
            started = time.monotonic()
            self._rewind = None  # this fetch starts at the cursor: earlier rewinds are covered
            try:
                if self._cursor is None:
                    public = await self.store.load_namespace(PUBLIC)
                    changes = Changes(revision=public.revision, upserted=public.images, deleted=[])
                else:
                    changes = await self.store.changes_since(self._cursor)
            except BaseException:
                self.failed_at = time.monotonic()
                if self.on_refresh_failure is not None:
                    self.on_refresh_failure()
                raise
            self.apply(changes)
            self.confirmed_at = started

    def apply(self, changes: Changes) -> None:
        """Apply changes to what is held (images of orgs not held are skipped: they load fresh)."""
        for image_id, revision in changes.deleted:
            entry = self._entries.get(image_id)
            if entry is not None and entry.revision < revision:
                self._discard(entry)
        for image, revision in changes.upserted:
            self._upsert(image, revision)
        if changes.revision != self.revision or changes.upserted or changes.deleted:
            self._cache = {}
            self._pages = {}
        self.revision = max(changes.revision, self.revision or 0)
        self._cursor = changes.revision if self._rewind is None else min(changes.revision, self._rewind)
        self._rewind = None
        self._evict(keep="")

    def _upsert(self, image: ImageResp, revision: int) -> None:
        current = self._entries.get(image.id)
        if current is not None:
            if current.revision >= revision:
                return
            self._discard(current)
        if image.type is ImageType.PUBLIC:
            shelf = self._public
        else:
            held = self._orgs.get(str(image.orgId))
            if held is None:
                return
            shelf = held
            self._org_images += 1
        entry = make_entry(image, revision)
        self._entries[entry.id] = entry
        shelf.add(entry)

    def _discard(self, entry: Entry) -> None:
        del self._entries[entry.id]
        if entry.namespace == PUBLIC:
            self._public.remove(entry)
        else:
            self._orgs[entry.namespace].remove(entry)
            self._org_images -= 1

    # ------------------------------------------------------------------------------ background tasks

    async def poll_forever(self, interval: float) -> None:
        """Keep the read model fresh so requests never wait on the database."""
        failing = False
        while True:
            try:
                await within(self._refreshing(), REFRESH_TIMEOUT * 2)
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
        """PostgreSQL: refresh as soon as any process commits a change."""
        while True:
            try:
                async for _revision in self.store.notifications():
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poller covers freshness meanwhile; reconnect shortly
                log.debug("catalog listener reconnecting: %s: %s", exc.__class__.__name__, exc)
            await asyncio.sleep(1.0)
