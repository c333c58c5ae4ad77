"""The read model: the catalog in memory, indexed, with serialized responses cached per visible set.

The read endpoints come in through one door: ``view = await catalog.view(org)`` (fresh, and the org
loaded when it is not held), then ``view.list(query)`` or ``view.get(image_id)`` (view.py). The parts:

- entries.py: one held image (``Entry``), built from its stored body;
- shelves.py: a namespace's entries, sorted in list order ("public", or an org id);
- answers.py: serialized answers, cached per visible set;
- holdings.py: what is held, applying changes, eviction past the bounds;
- loading.py: org loads on first use, coalesced into batches, and the warm start;
- this module: ``Catalog``, freshness, polling (shared by a replica's workers: ../revisionboard.py)
  and LISTEN.

Freshness: the catalog knows the database revision it reflects and when that was last confirmed.
``ensure_fresh`` lets a request through while the confirmation is younger than the bound; otherwise it
refreshes from the store first and, if that fails, the request gets a 503 instead of stale data.
Changes are applied idempotently (each entry remembers the revision that wrote it, and older news is
ignored), which is what lets org loads and change polling interleave safely.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from ...deadline import within
from ...storage.records import PUBLIC_NAMESPACE as PUBLIC
from ...storage.records import Changes
from ...storage.store import Store
from ..errors import Unavailable
from ..revisionboard import RevisionBoard
from .loading import REFRESH_TIMEOUT, Loading
from .view import View

log = logging.getLogger(__name__)

BOARD_LOOKS_PER_POLL = 2  # looks at the board per CE_POLL_INTERVAL (see poll_forever): each wakes the
# worker, which costs about 0.3 ms of CPU on a loaded machine; 4 cost 9 ms/s more than 2 for 4 idle workers
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
        board: RevisionBoard | None = None,
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
        self.on_poll: Callable[[str], None] | None = None  # what served each poll (see _look)
        self.board = board  # the polls of this replica's other workers (revisionboard.py), if it has any
        self._region = board.claim_region() if board is not None else None  # where this one shares

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
