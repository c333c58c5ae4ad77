"""Org loads: an org's shelf from the database on its first request, and the warm start (``preload``).

Concurrent loads of many orgs are coalesced into one indexed query per batch (``load_org``), so a burst of
first requests costs one round trip per batch instead of one per org, and no load waits behind another
org's query. Before a worker is ready, ``preload`` holds the Customized images of every org that fits the
bounds; when all of them fit, the catalog is complete (holdings.py).

Images held from a read at some revision may have missed changes the poller skipped while their org was
not held, so every load rewinds the change cursor to the revision it read at (``_rewind_to``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ...deadline import within
from ...schemas import ImageType
from ...storage.records import Stored
from ...storage.store import Store
from ..errors import Unavailable
from .holdings import Holdings
from .shelves import Shelf
from .view import View

log = logging.getLogger(__name__)

REFRESH_TIMEOUT = 1.0  # a request waits at most this long for the database before answering 503
LOAD_BATCH = 256  # orgs loaded by one query, at most
CONCURRENT_LOADS = 2  # org-load queries in flight at once, at most


class Loading(Holdings):
    """Holdings that load the orgs they do not hold."""

    def __init__(
        self, store: Store, *, cache_size: int, max_images: int, max_orgs: int, compress_after: int | None
    ) -> None:
        super().__init__(
            cache_size=cache_size, max_images=max_images, max_orgs=max_orgs, compress_after=compress_after
        )
        self.store = store
        self._cursor: int | None = None  # changes are fetched from here (may rewind below revision)
        self._rewind: int | None = None  # lowest rewind asked for by org loads during a fetch
        self._loading: dict[str, asyncio.Future[Shelf]] = {}  # orgs asked for and not yet held
        self._wanted: list[str] = []  # of those, the ones no query has taken yet
        self._loaders: set[asyncio.Task[None]] = set()

    async def load_org(self, org: str) -> View:
        """The org's view, loading its shelf from the database when it is not held (once, however many
        requests ask; many orgs asked for at once share one query). Freshness is ``Catalog.view``'s."""
        own = self._shelf(org)
        if own is None:
            own = await self._load_shelf(org)
        return self._view(org, own)

    async def _load_shelf(self, org: str) -> Shelf:
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
                shelves = self._hold_at(batch, loaded.images, loaded.revision)
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

    def _hold_at(self, orgs: list[str], images: list[Stored], revision: int) -> dict[str, Shelf]:
        """Hold these orgs' shelves, built from all of their images as of at least ``revision``."""
        self._rewind_to(revision)
        return self._hold(orgs, images)

    def _rewind_to(self, revision: int) -> None:
        """Fetch changes again from ``revision`` on: images held from a read at ``revision`` may have
        missed changes the poller skipped while their org was not held. Fetching again is harmless
        (applying is idempotent) and closes the gap; a fetch already under way must not move the
        cursor past this point when it lands (``_rewind``)."""
        if self._cursor is None or revision < self._cursor:
            if self._cursor is not None:
                self._cursor = revision
            self._rewind = revision if self._rewind is None else min(self._rewind, revision)

    async def preload(self, batch: int = 10_000) -> None:
        """Warm start: hold every org's Customized images that fit the bounds (whole orgs, in namespace
        order). When all fit, the catalog is complete (holdings.py)."""
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
                    self._hold_at(taken, [stored for org in taken for stored in by_org[org]], revision)
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
