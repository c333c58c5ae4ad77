"""Catalog reads from a hot standby (``CE_DATABASE_READ_URL``) that never pass stale data off as fresh.

A standby replays the primary's WAL some time after the primary acknowledged it; how long after, the
standby itself cannot know. So the primary says what "current" is and the standby proves it has
reached it: every read starts with the primary's catalog revision R (one indexed row, the same query an
idle poll always made, so polls still cost the primary one tiny round trip), and the standby is used only
if its own ``catalog_state`` shows a revision of at least R. Every write acknowledged before R was read
has a revision of at most R (writers take revisions under the row lock, in commit order, and replay
keeps that order), so a standby answer at revision >= R holds all of them: the catalog may count the
poll as a confirmation of freshness as of its start, exactly as with the primary. Nothing here depends
on clocks, on WAL positions or on functions a non-superuser role may not see: both servers are asked the
same SELECT.

A standby behind R gets a short while (``CATCH_UP``) to replay it, when it was current at the previous
read (so a poll right after a commit, or a worker's read-your-writes refresh, does not fall back for the
few milliseconds replication takes); then, and at once while it stays behind (replay paused, a lagging
link), the read goes to the primary. A standby that fails or does not answer in time is left alone for
``RETRY_AFTER`` seconds, reads going to the primary meanwhile. The standby never makes the service
answer 503 by itself: it only takes reads off the primary while it can prove it is current.

Org loads, which do not confirm freshness themselves, need the standby at the highest revision this
process has seen (``floor``): their images join a catalog already confirmed at that revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..deadline import within
from .db import catalog_state, create_engine, uses_pgbouncer

log = logging.getLogger(__name__)

T = TypeVar("T")

CATCH_UP = 0.25  # how long a read waits for a standby that was current to replay the newest revision
RETRY_AFTER = 2.0  # after a standby failed (or did not answer in time), reads skip it this long
STANDBY_TIMEOUT = 0.5  # a standby read (beyond its catch-up wait) that takes longer goes to the primary
_STEP = 0.005  # between two looks at the standby's revision while it catches up


def _failures() -> tuple[type[BaseException], ...]:
    """What a standby read may fail with: SQLAlchemy's errors, and psycopg's own from the raw queries
    of org loads (a statement cancelled by a replay conflict, say); the standby is PostgreSQL, so psycopg
    is there."""
    import psycopg

    return (sa.exc.SQLAlchemyError, psycopg.Error, OSError, TimeoutError)


async def current_revision(conn: AsyncConnection) -> int:
    revision = await conn.scalar(sa.select(catalog_state.c.revision).where(catalog_state.c.id == 1))
    if revision is None:
        raise RuntimeError("catalog_state is empty: the database is not migrated")
    return int(revision)


class Behind(Exception):
    """The standby has not replayed the revision a read needs (within the catch-up wait)."""


class Standby:
    """The read engine of a standby, and what this process knows about the standby's state."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.pgbouncer = uses_pgbouncer(url)
        self.floor = 0  # the highest catalog revision this process has seen committed
        self.current = True  # the standby was at the needed revision at the last read
        self.down_until = float("-inf")  # time.monotonic() until which reads skip the standby
        self._state = "current"  # for the log: current | behind | down

    @classmethod
    def open(cls, url: str, *, pool_size: int = 5, max_overflow: int = 5) -> Standby:
        return cls(create_engine(url, pool_size=pool_size, max_overflow=max_overflow, read_only=True), url)

    def note(self, revision: int) -> None:
        self.floor = max(self.floor, revision)

    def owns(self, conn: AsyncConnection) -> bool:
        return conn.sync_engine is self.engine.sync_engine

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def _enter(self, state: str, detail: str = "") -> None:
        if state != self._state:
            level = logging.INFO if state == "current" else logging.WARNING
            messages = {
                "current": "catalog reads go to the standby again",
                "behind": "the standby is behind the primary: catalog reads go to the primary",
                "down": f"the standby failed ({detail}): catalog reads go to the primary",
            }
            log.log(level, messages[state])
            self._state = state

    def failed(self, exc: BaseException) -> None:
        self.down_until = time.monotonic() + RETRY_AFTER
        self.current = False
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        self._enter("down", f"{exc.__class__.__name__}: {detail}" if detail else exc.__class__.__name__)

    async def _caught_up(self, conn: AsyncConnection, target: int) -> None:
        """Return once the standby's catalog revision is ``target`` or later; ``Behind`` if it is not
        within the catch-up wait (none when it was behind at the last read)."""
        deadline = time.monotonic() + (CATCH_UP if self.current else 0.0)
        while True:
            revision = await current_revision(conn)
            await conn.rollback()  # the next look takes a new snapshot
            if revision >= target:
                return
            if time.monotonic() >= deadline:
                raise Behind()
            await asyncio.sleep(_STEP)

    async def recheck(self, target: int) -> None:
        """A poll that found nothing new, while the standby is behind (or was down): see whether it is at
        ``target`` now, so that the next change is read from it again."""
        if self.current or not self.usable():
            return
        self.note(target)
        try:
            await within(self._on_standby(target, _nothing), STANDBY_TIMEOUT)
        except Behind:
            return
        except _failures() as exc:
            self.failed(exc)
            return
        self.current = True
        self._enter("current")

    async def _on_standby(self, target: int, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self.engine.connect() as conn:
            await self._caught_up(conn, target)
            return await work(conn)

    async def read(
        self, primary: AsyncEngine, target: int, work: Callable[[AsyncConnection], Awaitable[T]]
    ) -> T:
        """``work`` on a standby connection at catalog revision ``target`` or later, else on the primary."""
        self.note(target)
        if self.usable():
            budget = STANDBY_TIMEOUT + (CATCH_UP if self.current else 0.0)
            try:
                result = await within(self._on_standby(target, work), budget)
            except Behind:
                self.current = False
                self._enter("behind")
            except _failures() as exc:
                self.failed(exc)
            else:
                self.current = True
                self._enter("current")
                return result
        async with primary.connect() as conn:
            return await work(conn)

    @contextlib.asynccontextmanager
    async def connection(self, primary: AsyncEngine, target: int) -> AsyncIterator[AsyncConnection]:
        """A connection for a long read (a streamed one, that no deadline here may cut): the standby's
        when it is at ``target`` or later, else the primary's."""
        self.note(target)
        if self.usable():
            connecting = asyncio.ensure_future(self._connect_at(target))
            try:
                conn = await within(connecting, STANDBY_TIMEOUT + CATCH_UP)
            except Behind:
                self.current = False
                self._enter("behind")
            except _failures() as exc:
                if isinstance(exc, TimeoutError):  # it may connect later: close that connection then
                    connecting.add_done_callback(_close_when_connected)
                self.failed(exc)
            else:
                try:
                    yield conn
                finally:
                    await conn.close()
                return
        async with primary.connect() as conn:
            yield conn

    async def _connect_at(self, target: int) -> AsyncConnection:
        conn = await self.engine.connect()
        try:
            await self._caught_up(conn, target)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        await self.engine.dispose()


async def _nothing(_conn: AsyncConnection) -> None:
    return None


_closing: set[asyncio.Task[None]] = set()


def _close_when_connected(connecting: asyncio.Future[AsyncConnection]) -> None:
    if connecting.cancelled() or connecting.exception() is not None:
        return
    task = asyncio.ensure_future(connecting.result().close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
