"""The read model: the catalog in memory, indexed, with serialized responses cached per visible set.

Layout: one ``Shelf`` per namespace ("public", or an org id for that org's Customized images). Each shelf
keeps its entries sorted in list order, whole and per ``idc``, per product and per (idc, product), so a
filtered query walks only its result. A caller's visible set is the public shelf merged with its own
org's shelf; a caller whose own shelf has nothing in the selection shares the Public answer.

Entries are built from each row's stored body (the served JSON, ``images.body``): loading an org decodes
only the few fields it is indexed by and never re-encodes. Concurrent loads of many orgs are coalesced
into one indexed query per batch (``load_org``), so a burst of first requests costs one round trip per
batch instead of one per org, and no load waits behind another org's query.

Warm start (``preload``): before a worker is ready it holds the Customized images of every org that fits
the bounds. When all of them fit, the catalog is *complete*: an org it does not hold has no Customized
images, so its first request needs no database at all, and changes to any org are applied as they come.
The first eviction ends completeness, and orgs not held load on first use again.

Memory stays bounded however many orgs there are: the Public shelf is always held, org shelves are held
for recently seen orgs only (least recently used go first, past ``max_images`` Customized images or
``max_orgs`` orgs, known-empty orgs included) and loaded from indexed SQL on first use.

List order (documented in the served OpenAPI document): ``createdAt`` ascending, then ``id`` ascending.

Freshness: the catalog knows the database revision it reflects and when that was last confirmed.
``ensure_fresh`` lets a request through while the confirmation is younger than the bound; otherwise it
refreshes from the store first and, if that fails, the request gets a 503 instead of stale data.
Changes are applied idempotently (each entry remembers the revision that wrote it, and older news is
ignored), which is what lets org loads and change polling interleave safely. A change invalidates only
the cached answers of the visible sets it touches: one org's for a Customized image, everyone's for a
Public one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import heapq
import itertools
import logging
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

import msgspec
import xxhash

from ..schemas import ImageType
from ..storage.records import Changes, Stored
from ..storage.store import Store
from .compact import BodyCodec
from .deadline import within
from .errors import Unavailable
from .revisionboard import RevisionBoard
from .validation import ListQuery, encode_cursor

log = logging.getLogger(__name__)

PUBLIC = "public"
SortKey = tuple[str, str]
REFRESH_TIMEOUT = 1.0  # a request waits at most this long for the database before answering 503
BOARD_LOOKS_PER_POLL = 2  # looks at the board per CE_POLL_INTERVAL (see poll_forever): each wakes the
# worker, which costs about 0.3 ms of CPU on a loaded machine; 4 cost 9 ms/s more than 2 for 4 idle workers
RETRY_AFTER_FAILURE = 0.25  # after a failed refresh, requests answer 503 at once for this long
LOAD_BATCH = 256  # orgs loaded by one query, at most
CONCURRENT_LOADS = 2  # org-load queries in flight at once, at most


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One image as held. A msgspec Struct: built several times faster than a frozen dataclass, and
    smaller (no GC header: it holds only strings, bytes and tuples of them, so it can't be in a cycle)."""

    id: str  # canonical lowercase uuid
    json: bytes  # the image's serialized ImageResp; a Customized one packed by the catalog's BodyCodec
    key: SortKey  # (createdAt as YYYY-MM-DDTHH:MM:SS.ffffff in UTC, id): string order equals time order
    namespace: str  # "public", or the owner org's id
    idc: str
    products: tuple[str, ...]
    revision: int  # the catalog revision that wrote this state of the image


def _sort_key(entry: Entry) -> SortKey:
    return entry.key


class _Indexed(msgspec.Struct):
    """The fields of a served image that the read model indexes it by (the rest stays in the bytes)."""

    id: str
    type: str
    orgId: str
    idc: str
    supportedProducts: list[str]
    createdAt: str


_indexed = msgspec.json.Decoder(_Indexed)


def _created_key(created: str) -> str:
    """``createdAt`` as stored bodies spell it (msgspec: UTC "Z", a four-digit year, six fraction digits
    or none) in one fixed-width form, so that string order is time order."""
    if len(created) == 20 and created[19] == "Z":
        return created[:19] + ".000000"
    if len(created) == 27 and created[26] == "Z":
        return created[:26]
    moment = dt.datetime.fromisoformat(created).astimezone(dt.UTC)  # any other spelling of an instant
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds")


# Product lists are shared between entries that have the same one (a catalog has few distinct lists).
_product_lists: dict[tuple[str, ...], tuple[str, ...]] = {}


def _products(listed: list[str]) -> tuple[str, ...]:
    products = tuple(listed)
    shared = _product_lists.get(products)
    if shared is None:
        if len(_product_lists) >= 100_000:  # arbitrary lists from writes: stay bounded
            _product_lists.clear()
        shared = _product_lists[products] = tuple([sys.intern(p) for p in products])
    return shared


# Revisions are shared too: a catalog import stamps every row with one, and each int object costs 32 bytes.
_revisions: dict[int, int] = {}


def make_entry(body: bytes, revision: int, codec: BodyCodec) -> Entry:
    """An entry from an image's stored body (its served JSON), a Customized one packed by ``codec``."""
    fields = _indexed.decode(body)
    shared = _revisions.get(revision)
    if shared is None:
        if len(_revisions) >= 100_000:
            _revisions.clear()
        shared = _revisions[revision] = revision
    public = fields.type == "Public"
    return Entry(
        fields.id,
        body if public else codec.pack(body),
        (_created_key(fields.createdAt), fields.id),
        PUBLIC if public else sys.intern(fields.orgId),
        sys.intern(fields.idc),
        _products(fields.supportedProducts),
        shared,
    )


class IndexedShelf:
    """The Public images, sorted, with an index for every filter combination (every caller reads them,
    so each query walks only its result)."""

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

    def fill(self, entries: list[Entry]) -> None:
        """Hold ``entries`` on an empty shelf: one sort, then appends that keep every list sorted."""
        assert not self.all
        entries.sort(key=_sort_key)
        by_idc, by_product, by_pair = self.by_idc, self.by_product, self.by_idc_product
        for entry in entries:
            idc = entry.idc
            by_idc.setdefault(idc, []).append(entry)
            for product in entry.products:
                by_product.setdefault(product, []).append(entry)
                by_pair.setdefault((idc, product), []).append(entry)
        self.all = entries

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


class Shelf:
    """One org's Customized images, sorted; a filtered selection is computed on first use and kept
    until the shelf changes. An org has tens of images, so this is cheaper to build than indexes (the
    cold path builds one per org's first request) and holds only the selections asked for."""

    __slots__ = ("_selections", "all")
    MAX_SELECTIONS = 64  # kept per shelf; past this they are dropped and computed again when asked

    def __init__(self) -> None:
        self.all: list[Entry] = []
        self._selections: dict[tuple[str | None, str | None], list[Entry]] = {}

    def add(self, entry: Entry) -> None:
        bisect.insort(self.all, entry, key=_sort_key)
        self._selections.clear()

    def remove(self, entry: Entry) -> None:
        at = bisect.bisect_left(self.all, entry.key, key=_sort_key)
        if at < len(self.all) and self.all[at] is entry:
            del self.all[at]
        self._selections.clear()

    def fill(self, entries: list[Entry]) -> None:
        """Hold ``entries`` (an empty shelf's first images): one sort."""
        assert not self.all
        entries.sort(key=_sort_key)
        self.all = entries

    def select(self, idc: str | None, product: str | None) -> list[Entry]:
        if idc is None and product is None:
            return self.all
        selection = self._selections.get((idc, product))
        if selection is None:
            selection = [
                entry
                for entry in self.all
                if (idc is None or entry.idc == idc) and (product is None or product in entry.products)
            ]
            if len(self._selections) >= self.MAX_SELECTIONS:
                self._selections.clear()
            self._selections[(idc, product)] = selection
        return selection

    def __len__(self) -> int:
        return len(self.all)


EMPTY = Shelf()  # what a complete catalog answers for an org it does not hold (never given images)


def etag_of(body: bytes) -> bytes:
    """The strong ETag of a body: 128 bits of XXH3, equal for equal bytes on every worker and replica.
    Not a cryptographic hash, and it needs not be one (answers are only ever compared with answers of the
    same caller's own view); blake2b cost 75 µs for a 19 kB list here, XXH3 0.65 µs."""
    return b'"' + xxhash.xxh3_128_hexdigest(body).encode() + b'"'


@dataclass(frozen=True, slots=True)
class Rendered:
    """A serialized answer with its strong ETag and its response headers, built once."""

    body: bytes
    etag: bytes
    headers: list[tuple[bytes, bytes]]
    headers_304: list[tuple[bytes, bytes]]

    @classmethod
    def of(cls, body: bytes, link: bytes | None = None) -> Rendered:
        etag = etag_of(body)
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


def render(entries: Iterable[Entry], unpack: Callable[[bytes], bytes], link: bytes | None = None) -> Rendered:
    return Rendered.of(b"[" + b",".join([unpack(entry.json) for entry in entries]) + b"]", link)


def next_link(query: ListQuery, last: SortKey) -> bytes:
    params = {"idc": query.idc, "product": query.product, "limit": query.limit, "cursor": encode_cursor(last)}
    target = "/v1/images?" + urlencode({k: v for k, v in params.items() if v is not None})
    return f'<{target}>; rel="next"'.encode()


CacheKey = tuple[str | None, str | None]


class Catalog:
    def __init__(
        self,
        store: Store,
        *,
        freshness_bound: float = 1.0,
        cache_size: int = 4096,
        max_images: int = 1_500_000,
        max_orgs: int = 100_000,
        compress_after: int | None = 2000,
        board: RevisionBoard | None = None,
    ) -> None:
        self.store = store
        self.board = board  # the polls of this replica's other workers (revisionboard.py), if it has any
        self._region = board.claim_region() if board is not None else None  # where this one shares
        self.freshness_bound = freshness_bound
        self.cache_size = cache_size  # cached list answers (whole lists and pages each), at most
        self.max_images = max_images  # Customized images held in memory, at most
        self.max_orgs = max_orgs  # org shelves (empty ones included) held in memory, at most
        self.revision: int | None = None  # the database revision this read model reflects
        self.confirmed_at = float("-inf")  # time.monotonic() when the revision was last confirmed
        self.failed_at = float("-inf")  # time.monotonic() of the last failed refresh
        self.complete = False  # every org with Customized images is held (see the module docstring)
        self._cursor: int | None = None  # changes are fetched from here (may rewind below revision)
        self._rewind: int | None = None  # lowest rewind asked for by org loads during a fetch
        self._entries: dict[str, Entry] = {}
        self._public = IndexedShelf()
        self._orgs: OrderedDict[str, Shelf] = OrderedDict()
        self._org_images = 0
        self._loading: dict[str, asyncio.Future[Shelf]] = {}  # orgs asked for and not yet held
        self._wanted: list[str] = []  # of those, the ones no query has taken yet
        self._loaders: set[asyncio.Task[None]] = set()
        # Cached answers, per visible set ("public", or an org whose own images are in the answer), so
        # that a change drops only the answers of the sets it touches.
        self._cache: dict[str, dict[CacheKey, Rendered]] = {}
        self._cached = 0
        self._pages: dict[str, dict[ListQuery, Rendered]] = {}
        self._paged = 0
        self._items: dict[str, tuple[Entry, Rendered]] = {}
        self._codec = BodyCodec(train_after=compress_after)
        self._refresh_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self.on_refresh_failure: Callable[[], None] | None = None  # e.g. a metrics hook
        self.on_poll: Callable[[str], None] | None = None  # "database" or "board": what confirmed a poll

    # ------------------------------------------------------------------------------------ queries

    def org_shelf(self, org: str) -> Shelf | None:
        """The org's shelf if it is held (marking it recently used), else None: see ``load_org``."""
        shelf = self._orgs.get(org)
        if shelf is not None:
            self._orgs.move_to_end(org)
            return shelf
        return EMPTY if self.complete else None

    def list_images(self, org: str, own: Shelf, idc: str | None, product: str | None) -> Rendered:
        """The images ``org`` may see (Public + ``own``), filtered, serialized; cached per visible set."""
        mine = own.select(idc, product)
        visible = org if mine else PUBLIC
        answers = self._cache.get(visible)
        rendered = None if answers is None else answers.get((idc, product))
        if rendered is None:
            public = self._public.select(idc, product)
            # both are sorted: Timsort merges the two runs in C, several times faster than heapq.merge
            unpack = self._codec.unpack
            rendered = render(sorted([*public, *mine], key=_sort_key) if mine else public, unpack)
            if self.cache_size:
                if self._cached >= self.cache_size:
                    self._cached -= len(self._cache.pop(next(iter(self._cache))))
                self._cache.setdefault(visible, {})[(idc, product)] = rendered
                self._cached += 1
        return rendered

    def page(self, org: str, own: Shelf, query: ListQuery) -> Rendered:
        """One page of ``list_images``: up to ``query.limit`` images after ``query.after``, with a
        ``Link: <…>; rel="next"`` header when more follow."""
        mine = own.select(query.idc, query.product)
        visible = org if mine else PUBLIC
        answers = self._pages.get(visible)
        rendered = None if answers is None else answers.get(query)
        if rendered is None:
            sources = [self._public.select(query.idc, query.product)]
            if mine:
                sources.append(mine)
            if query.after is not None:
                sources = [s[bisect.bisect_right(s, query.after, key=_sort_key) :] for s in sources]
            merged = heapq.merge(*sources, key=_sort_key) if len(sources) > 1 else iter(sources[0])
            limit = query.limit or len(self._entries) + 1
            entries = list(itertools.islice(merged, limit + 1))
            link = None
            if len(entries) > limit:
                del entries[limit:]
                link = next_link(query, entries[-1].key)
            rendered = render(entries, self._codec.unpack, link)
            if self.cache_size:
                if self._paged >= self.cache_size:
                    self._paged -= len(self._pages.pop(next(iter(self._pages))))
                self._pages.setdefault(visible, {})[query] = rendered
                self._paged += 1
        return rendered

    def item(self, entry: Entry) -> Rendered:
        """One image's answer (body, ETag, headers), built once per state of the image."""
        held = self._items.get(entry.id)
        if held is not None and held[0] is entry:
            return held[1]
        rendered = Rendered.of(self._codec.unpack(entry.json))  # a new state of the image: rebuild
        if self.cache_size:
            if len(self._items) >= self.cache_size * 16:
                del self._items[next(iter(self._items))]
            self._items[entry.id] = (entry, rendered)
        return rendered

    def get(self, image_id: str) -> Entry | None:
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

    def _forget_answers(self, namespace: str) -> None:
        """Drop the cached answers that show ``namespace``'s images (all of them for Public)."""
        if namespace == PUBLIC:
            self._cache, self._cached, self._pages, self._paged = {}, 0, {}, 0
            return
        answers = self._cache.pop(namespace, None)
        if answers is not None:
            self._cached -= len(answers)
        pages = self._pages.pop(namespace, None)
        if pages is not None:
            self._paged -= len(pages)

    # ----------------------------------------------------------------------------------- org shelves

    async def load_org(self, org: str) -> Shelf:
        """Hold the org's shelf, loading it from the database (once, however many requests ask; many
        orgs asked for at once share one query)."""
        shelf = self.org_shelf(org)
        if shelf is not None:
            return shelf
        pending = self._loading.get(org)
        if pending is None:
            pending = self._loading[org] = asyncio.get_running_loop().create_future()
            self._wanted.append(org)
            if len(self._loaders) < CONCURRENT_LOADS:
                loader = asyncio.create_task(self._load_wanted(), name="org-loader")
                self._loaders.add(loader)
                loader.add_done_callback(self._loaders.discard)
        # No deadline of its own here: the query its batch runs has one (a database that does not answer
        # in time is a 503); the wait before that query is other orgs' loads being built, and a healthy
        # database must not turn a queue into 503s.
        return await asyncio.shield(pending)

    async def _load_wanted(self) -> None:
        """Load the wanted orgs, a batch per query, until none are left. Every org taken is answered:
        its shelf, or ``Unavailable`` when the query failed or missed its deadline."""
        while self._wanted:
            batch = self._wanted[:LOAD_BATCH]
            del self._wanted[:LOAD_BATCH]
            shelves: dict[str, Shelf] = {}
            try:
                loaded = await within(self.store.load_namespaces(batch), REFRESH_TIMEOUT)
                shelves = self._hold(batch, loaded.images, loaded.revision)
            except Exception as exc:
                log.warning("loading %d orgs failed: %s", len(batch), exc.__class__.__name__)
            finally:  # also when cancelled: no waiter is left without an answer
                for org in batch:
                    pending = self._loading.pop(org)
                    if org in shelves:
                        pending.set_result(shelves[org])
                    else:
                        pending.set_exception(Unavailable())
                        pending.exception()  # retrieved: waiters get it via await

    def _hold(self, orgs: list[str], images: list[Stored], revision: int) -> dict[str, Shelf]:
        """Hold these orgs' shelves, built from all of their images as of at least ``revision``."""
        shelves: dict[str, Shelf] = {}
        fresh: dict[str, list[Entry]] = {}  # orgs not held until now: their entries, to fill at once
        for org in orgs:
            shelf = self._orgs.get(org)
            if shelf is None:
                shelf = self._orgs[org] = Shelf()
                fresh[org] = []
                self._forget_answers(org)
            shelves[org] = shelf
        for body, image_revision in images:
            entry = make_entry(body, image_revision, self._codec)
            found = fresh.get(entry.namespace)
            if found is not None and entry.id not in self._entries:
                found.append(entry)
            else:  # its org was held already, or the image moved between orgs meanwhile: newest wins
                self._upsert(entry)
        for org, entries in fresh.items():
            shelf = shelves[org]
            if shelf:  # an image moved into it above
                for entry in entries:
                    self._upsert(entry)
                continue
            shelf.fill(entries)
            for entry in entries:
                self._entries[entry.id] = entry
            self._org_images += len(entries)
        self._rewind_to(revision)
        self._evict(keep=shelves)
        return shelves

    def _rewind_to(self, revision: int) -> None:
        """Fetch changes again from ``revision`` on: images held from a read at ``revision`` may have
        missed changes the poller skipped while their org was not held. Fetching again is harmless
        (applying is idempotent) and closes the gap; a fetch already under way must not move the
        cursor past this point when it lands (``_rewind``)."""
        if self._cursor is None or revision < self._cursor:
            if self._cursor is not None:
                self._cursor = revision
            self._rewind = revision if self._rewind is None else min(self._rewind, revision)

    def _evict(self, keep: Iterable[str] = ()) -> None:
        kept = set(keep)
        while (self._org_images > self.max_images or len(self._orgs) > self.max_orgs) and len(
            self._orgs
        ) > len(kept):
            org, shelf = next(iter(self._orgs.items()))
            if org in kept:
                self._orgs.move_to_end(org)
                continue
            del self._orgs[org]
            for entry in shelf.all:
                del self._entries[entry.id]
            self._org_images -= len(shelf)
            self._forget_answers(org)
            self.complete = False  # an org not held may have images again

    async def preload(self, batch: int = 10_000) -> None:
        """Warm start: hold every org's Customized images that fit the bounds (whole orgs, in namespace
        order). When all fit, the catalog is complete (see the module docstring)."""
        started = time.monotonic()
        everything = True
        async with contextlib.aclosing(self.store.customized(batch)) as batches:
            async for revision, rows in batches:
                by_org: dict[str, list[Stored]] = {}
                for namespace, stored in rows:
                    by_org.setdefault(namespace, []).append(stored)
                room = min(self.max_orgs - len(self._orgs), len(by_org))
                orgs = list(by_org)[:room]
                taken: list[str] = []
                images = self._org_images
                for org in orgs:
                    images += len(by_org[org])
                    if images > self.max_images:
                        break
                    taken.append(org)
                if taken:
                    self._hold(taken, [stored for org in taken for stored in by_org[org]], revision)
                if len(taken) < len(by_org):
                    everything = False
                    break
                await asyncio.sleep(0)  # let the loop breathe between batches
        self.complete = everything
        held = self.held()
        log.info(
            "preloaded %d Customized images of %d orgs in %.2fs%s",
            held[ImageType.CUSTOMIZED.value],
            held["orgs"],
            time.monotonic() - started,
            " (all of them)" if everything else " (the bounds hold no more; others load on first use)",
        )

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

    def _refreshing(
        self, *, only_if_stale: bool = False, seen: tuple[int, float] | None = None
    ) -> asyncio.Task[None]:
        """The refresh in progress, or a new one: requests and the poller wait for the same one, and
        a refresh that outlives their deadlines is never cancelled (see deadline.py)."""
        task = self._refresh_task
        if task is None or task.done():
            task = self._refresh_task = asyncio.create_task(
                self.refresh(only_if_stale=only_if_stale, seen=seen)
            )
        return task

    async def refresh(self, *, only_if_stale: bool = False, seen: tuple[int, float] | None = None) -> None:
        """Bring the read model up to the database's current revision (one refresh at a time), or up to
        ``seen``: a revision another worker of this replica read from the database, and when (the board's
        record), which then confirms the read model as of that time without asking for the revision."""
        async with self._refresh_lock:
            if only_if_stale and self.is_fresh():  # another request refreshed while we waited
                return
            started = time.monotonic()
            self._rewind = None  # this fetch starts at the cursor: earlier rewinds are covered
            since = self._cursor
            try:
                if since is None:
                    public = await self.store.load_namespace(PUBLIC)
                elif seen is None:
                    changes = await self.store.changes_since(since)
                else:
                    changes = await self.store.changes_since(since, seen[0])
            except BaseException:
                self.failed_at = time.monotonic()
                if self.on_refresh_failure is not None:
                    self.on_refresh_failure()
                raise
            if since is None:
                self._hold_public(public.images)
                changes = Changes(revision=public.revision, upserted=[], deleted=[])
            self.apply(changes)
            confirmed = started if seen is None else seen[1]
            self.confirmed_at = max(self.confirmed_at, confirmed)
            if self.board is not None:
                if since is not None and changes.revision > since and self._region is not None:
                    self.board.share_changes(self._region, since, changes, confirmed)
                if seen is None:
                    self.board.publish(changes.revision, started)

    def _hold_public(self, images: list[Stored]) -> None:
        """The first load of the Public images (one sort, however many)."""
        entries = [make_entry(body, revision, self._codec) for body, revision in images]
        if self._public:
            for entry in entries:
                self._upsert(entry)
            return
        entries = [entry for entry in entries if entry.id not in self._entries]
        self._public.fill(entries)
        for entry in entries:
            self._entries[entry.id] = entry
        self._forget_answers(PUBLIC)

    def apply(self, changes: Changes) -> None:
        """Apply changes to what is held (images of orgs not held are skipped: they load fresh)."""
        self._apply_images(changes)
        self.revision = max(changes.revision, self.revision or 0)
        self._cursor = changes.revision if self._rewind is None else min(changes.revision, self._rewind)
        self._rewind = None
        self._evict()

    def apply_own(self, write: Changes, began: float) -> None:
        """Apply a write this process just committed (read-your-writes, Store.on_commit), without reading
        the database again. When it is the revision right after the one held (no other process wrote in
        between), the read model is at its revision now, and was current when the write committed, which
        confirms it as of ``began`` (time.monotonic() before the write began) as a poll would. Otherwise
        the revision and the change cursor stay, and the next refresh fetches everything after them (this
        write included, a no-op by then)."""
        self._apply_images(write)
        revision = write.revision
        if (
            self._rewind is None
            and self.revision is not None
            and self._cursor == self.revision == revision - 1
        ):
            self.revision = self._cursor = revision
            self.confirmed_at = max(self.confirmed_at, began)
        self._evict()

    def _apply_images(self, changes: Changes) -> None:
        for image_id, revision in changes.deleted:
            entry = self._entries.get(image_id)
            if entry is not None and entry.revision < revision:
                self._discard(entry)
        for body, revision in changes.upserted:
            self._upsert(make_entry(body, revision, self._codec))

    def _upsert(self, entry: Entry) -> None:
        current = self._entries.get(entry.id)
        if current is not None:
            if current.revision >= entry.revision:
                return
            self._discard(current)
        if entry.namespace == PUBLIC:
            self._public.add(entry)
        else:
            shelf = self._orgs.get(entry.namespace)
            if shelf is None:
                if not self.complete:
                    return
                shelf = self._orgs[entry.namespace] = Shelf()  # a complete catalog holds every org
            shelf.add(entry)
            self._org_images += 1
        self._entries[entry.id] = entry
        self._forget_answers(entry.namespace)

    def _discard(self, entry: Entry) -> None:
        del self._entries[entry.id]
        if entry.namespace == PUBLIC:
            self._public.remove(entry)
        else:
            self._orgs[entry.namespace].remove(entry)
            self._org_images -= 1
        self._forget_answers(entry.namespace)

    # ------------------------------------------------------------------------------ background tasks

    async def poll_forever(self, interval: float) -> None:
        """Keep the read model fresh so requests never wait on the database: confirm it at least every
        ``interval``, by asking the database or (with a board) by another worker's answer."""
        failing = False
        # With a board, a look at it costs no query: look more often than the interval, so that a change
        # another worker found is applied soon after, while the database is asked about once per interval.
        looks = interval / BOARD_LOOKS_PER_POLL
        while True:
            try:
                step, seen = self._look(interval)
                if step in ("database", "fetched"):
                    await within(self._refreshing(seen=seen), REFRESH_TIMEOUT * 2)
                if self.on_poll is not None and step:
                    self.on_poll(step)
                if failing:
                    log.info("catalog refresh recovered at revision %s", self.revision)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # log the first failure of an outage, not one line per poll
                    log.warning("catalog refresh failing: %s: %s", exc.__class__.__name__, exc)
                failing = True
            # Jittered: workers started together would otherwise look in step, all find a poll due at once
            # and all ask the database.
            await asyncio.sleep(
                interval if self.board is None or failing else looks * random.uniform(0.5, 1.5)
            )

    def _look(self, interval: float) -> tuple[str, tuple[int, float] | None]:
        """What the poller does now, and what for the metrics. Without a board: ask the database
        ("database"). With one:
        - another worker saw a newer revision: apply the changes it shared ("shared"), or fetch them up
          to that revision without asking for it ("fetched", with the board's record);
        - another worker's poll found the revision held: confirmed as of its time ("board");
        - then ask the database if the read model was last confirmed ``interval`` ago or more
          ("database"), else nothing ("")."""
        if self.board is None or self.revision is None or self._cursor is None:
            return "database", None
        if self._refresh_lock.locked():
            return "", None  # a refresh is under way (a request's): it confirms
        seen = self.board.read()
        step = ""
        if seen is not None:
            revision, at = seen
            if revision > self.revision or self._cursor < revision:
                if self._apply_shared(revision):
                    return "shared", None
                return "fetched", seen
            if revision == self.revision == self._cursor and self._rewind is None and at > self.confirmed_at:
                self.confirmed_at, step = at, "board"
        if time.monotonic() - self.confirmed_at >= interval:
            return "database", None
        return step, None

    def _apply_shared(self, target: int) -> bool:
        """Apply the changes other workers shared, from the cursor toward revision ``target``; True when
        that reached it (the read model is then confirmed as of the time the last record's was)."""
        assert self.board is not None and self._cursor is not None
        for _ in range(self.board.regions):
            found = self.board.changes_from(self._cursor)
            if found is None:
                return False
            changes, at = found
            self._rewind = None  # the record starts at or before the cursor: it covers any rewind
            self.apply(changes)
            if self._cursor == self.revision == changes.revision:
                self.confirmed_at = max(self.confirmed_at, at)
            if self._cursor >= target:
                return True
        return False

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
