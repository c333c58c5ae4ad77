"""The read model: the catalog in memory, indexed, with serialized responses cached per visible set.

The read endpoints come in through one door: ``view = await catalog.view(org)`` (fresh, and the org
loaded when it is not held), then ``view.list(query)`` or ``view.get(image_id)`` (view.py). The parts:

- entries.py: one held image (``Entry``), built from its stored body;
- shelves.py: a namespace's entries, sorted in list order ("public", or an org id);
- answers.py: serialized answers, cached per visible set;
- holdings.py: what is held, applying changes, eviction past the bounds;
- loading.py: org loads on first use, coalesced into batches, and the warm start;
- this module: ``Catalog``, freshness, polling and LISTEN.

Freshness: the catalog knows the database revision it reflects and when that was last confirmed.
``ensure_fresh`` lets a request through while the confirmation is younger than the bound; otherwise it
refreshes from the store first and, if that fails, the request gets a 503 instead of stale data.
Changes are applied idempotently (each entry remembers the revision that wrote it, and older news is
ignored), which is what lets org loads and change polling interleave safely.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ...deadline import within
from ...storage.records import PUBLIC_NAMESPACE as PUBLIC
from ...storage.records import Changes
from ...storage.store import Store
from ..errors import Unavailable
from .loading import REFRESH_TIMEOUT, Loading
from .view import View

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE = 0.25  # after a failed refresh, requests answer 503 at once for this long


class Catalog(Loading):
    def __init__(
        self,
        store: Store,
        *,
        freshness_bound: float = 1.0,
        cache_size: int = 4096,
        max_images: int = 1_500_000,
        max_orgs: int = 100_000,
        compress_after: int | None = 2000,
    ) -> None:
        super().__init__(
            store,
            cache_size=cache_size,
            max_images=max_images,
            max_orgs=max_orgs,
            compress_after=compress_after,
        )
        self.freshness_bound = freshness_bound
        self.revision: int | None = None  # the database revision this read model reflects
        self.confirmed_at = float("-inf")  # time.monotonic() when the revision was last confirmed
        self.failed_at = float("-inf")  # time.monotonic() of the last failed refresh
        self._refresh_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self.on_refresh_failure: Callable[[], None] | None = None  # e.g. a metrics hook

    async def view(self, org: str) -> View:
        """What ``org`` sees, fresh (else ``Unavailable``), its shelf loaded when it was not held."""
        if not self.is_fresh():
            await self.ensure_fresh()
        own = self._shelf(org)
        if own is None:
            own = await self._load_shelf(org)
        return self._view(org, own)

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
                else:
                    changes = await self.store.changes_since(self._cursor)
            except BaseException:
                self.failed_at = time.monotonic()
                if self.on_refresh_failure is not None:
                    self.on_refresh_failure()
                raise
            if self._cursor is None:
                self._hold_public(public.images)
                changes = Changes(revision=public.revision, upserted=[], deleted=[])
            self.apply(changes)
            self.confirmed_at = started

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
