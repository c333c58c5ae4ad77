"""The import itself: read, validate, plan and write in batches in one transaction, and the report."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import sys
from collections.abc import Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from ...rules.catalog_entries import CatalogEntry, read_catalog_entry
from ...schemas import ValidationDetail
from ..errors import Duplicate
from ..records import DUPLICATE
from .planning import Plan, Planner, Write
from .progress import QUIET, Progress
from .reading import CatalogSource, _NotJson
from .shared import _Problems
from .sql import _Database, _database

if TYPE_CHECKING:
    from ..records import Actor, ImportReport
    from ..store import Store

CREATE_BATCH = 5_000
UPDATE_BATCH = 2_000


class _Writes:
    """Batches the planned writes and their audit rows. A batch's statements run while the next batch
    is read and planned (one batch in flight at a time, in order): the database works on one core while
    the file is parsed on the other."""

    def __init__(self, db: _Database, revision: int, actor: Actor, now: dt.datetime) -> None:
        self.db, self.revision, self.actor, self.now = db, revision, actor, now
        self.creates: list[Write] = []
        self.updates: list[Write] = []
        self.in_flight: asyncio.Future[None] | None = None

    async def add(self, write: Write) -> None:
        if write.kind == "create":
            self.creates.append(write)
            if len(self.creates) >= CREATE_BATCH:
                await self._start(self._creates())
        else:
            self.updates.append(write)
            if len(self.updates) >= UPDATE_BATCH:
                await self._start(self._updates())

    async def _start(self, job: Coroutine[Any, Any, None]) -> None:
        await self.wait()
        self.in_flight = asyncio.ensure_future(job)
        await asyncio.sleep(0)  # let it send its first statement

    async def wait(self) -> None:
        """Until the batch in flight is written (raising what it raised)."""
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            await in_flight

    async def abandon(self) -> None:
        """The import failed: let the batch in flight end before the transaction is rolled back."""
        with contextlib.suppress(Exception):
            await self.wait()

    def _creates(self) -> Coroutine[Any, Any, None]:
        writes, self.creates = self.creates, []

        async def job() -> None:
            if writes:
                await self.db.create(writes, self.revision, self.now, self.actor)

        return job()

    def _updates(self) -> Coroutine[Any, Any, None]:
        writes, self.updates = self.updates, []
        db, revision, now, actor = self.db, self.revision, self.now, self.actor

        async def job() -> None:
            if not writes:
                return
            before = await db.bodies([w.image_id for w in writes])
            await db.update(writes, revision, now)
            decode = msgspec.json.decode
            diffs = [
                (w.image_id, json.dumps(_diff(decode(before[w.image_id]), decode(w.body)))) for w in writes
            ]
            await db.audit(db.audit_rows(now, revision, "update", actor, diffs))

        return job()

    async def flush(self) -> None:
        await self.wait()
        await self._creates()
        await self._updates()

    async def finish(self, plan: Plan, progress: Progress) -> None:
        await self.flush()
        db, revision, now, actor = self.db, self.revision, self.now, self.actor
        if plan.deleted:
            progress.phase(f"catalog import: deleting {len(plan.deleted):,} images")
        for start in range(0, len(plan.deleted), CREATE_BATCH):
            gone = await db.delete(plan.deleted[start : start + CREATE_BATCH], revision)
            # a delete records what was removed
            await db.audit(
                db.audit_rows(now, revision, "delete", actor, [(i, body.decode()) for i, body in gone])
            )
        moved = [w.image_id for w in plan.deferred if w.kind == "update"]
        for start in range(0, len(moved), CREATE_BATCH):
            await db.move_away(moved[start : start + CREATE_BATCH])
        for write in plan.deferred:
            await self.add(write)
        await self.flush()


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        key: {"from": before.get(key), "to": value}
        for key, value in after.items()
        if before.get(key) != value
    }


async def import_entries(
    store: Store,
    entries: Iterable[CatalogEntry],
    *,
    dry_run: bool = False,
    prune: bool = False,
    actor: Actor | None = None,
    progress: Progress = QUIET,
) -> ImportReport:
    """Import entries validated already (``read_catalog_entries``)."""
    return await _import(
        store, enumerate(entries), dry_run=dry_run, prune=prune, actor=actor, progress=progress
    )


async def import_source(
    store: Store,
    source: CatalogSource,
    *,
    dry_run: bool = False,
    prune: bool = False,
    actor: Actor | None = None,
    progress: Progress = QUIET,
) -> ImportReport:
    """Import a catalog file (JSON streamed, YAML read whole), validating entry by entry. Raises
    CatalogFileError (not JSON nor YAML), CatalogInvalid (the entries' problems) or Duplicate."""
    try:
        return await _import(
            store, _validated(source, progress), dry_run=dry_run, prune=prune, actor=actor, progress=progress
        )
    except _NotJson as problem:
        source = source.as_yaml(problem)
        return await _import(
            store, _validated(source, progress), dry_run=dry_run, prune=prune, actor=actor, progress=progress
        )


class _Invalid:
    """Stands for an entry that failed validation; its problems are in ``problems``."""

    def __init__(self, problems: list[ValidationDetail]) -> None:
        self.problems = problems


def _validated(source: CatalogSource, progress: Progress) -> Iterator[tuple[int, CatalogEntry | _Invalid]]:
    size = source.size
    for position, item in enumerate(source.items()):
        if type(item) is CatalogEntry:
            yield position, item
        else:
            problems: list[ValidationDetail] = []
            entry = read_catalog_entry(item, position, problems)
            yield position, (entry if entry is not None else _Invalid(problems))
        if position % 4096 == 0:
            share = f" ({100 * source.position / size:.0f}%)" if size else ""
            progress.update(f"{position:,} entries{share}")


async def _import(
    store: Store,
    entries: Iterable[tuple[int, CatalogEntry | _Invalid]],
    *,
    dry_run: bool,
    prune: bool,
    actor: Actor | None,
    progress: Progress,
) -> ImportReport:
    import sqlite3

    import psycopg
    from sqlalchemy.exc import IntegrityError

    from ..records import Actor, ImportReport, utcnow

    actor = actor or Actor(org_id=None, name="cli:catalog-import")
    report = ImportReport()
    problems = _Problems()
    try:
        async with store.engine.begin() as conn:
            revision = await store._bump(conn)
            db = await _database(conn)
            await db.prepare()
            writes: _Writes | None = None
            gc.freeze()  # what is there now lives until the end: keep the collector off it
            # the database's thread (SQLite) gets Python's lock back soon after each statement step,
            # instead of waiting out the default 5 ms while the file is parsed
            # an import allocates millions of short-lived objects and no cycles worth collecting before
            # it ends: the collector's passes over them cost a fifth of its time
            collecting = gc.isenabled()
            gc.disable()
            switch = sys.getswitchinterval()
            sys.setswitchinterval(min(switch, 0.0005))
            try:
                progress.phase("catalog import: reading the stored images")
                index = await db.load_index(progress)
                gc.freeze()
                now = utcnow()
                planner = Planner(index, report, prune=prune, now=now)
                writes = _Writes(db, revision, actor, now)
                progress.phase("catalog import: importing")
                for position, entry in entries:
                    if isinstance(entry, _Invalid):
                        problems.extend(entry.problems)
                        planner.skip()
                        continue
                    write = planner.add(position, entry)
                    if write is not None:
                        await writes.add(write)
                    if not position % 256:
                        await asyncio.sleep(0)  # the batch in flight goes on to its next statement
                if problems:
                    raise problems.error()
                plan = planner.finish()
                del planner, index  # the bulk of the memory an import holds
                gc.unfreeze()
                if not (report.created or report.updated or report.deleted):
                    await conn.rollback()
                    return report
                progress.phase("catalog import: writing")
                await writes.finish(plan, progress)
            finally:
                sys.setswitchinterval(switch)
                gc.unfreeze()
                if collecting:
                    gc.enable()
                if writes is not None:
                    await writes.abandon()
                await db.done()
            if dry_run:  # everything ran, constraints included; now undo it
                await conn.rollback()
                return report
            progress.phase("catalog import: committing")
            report.revision = revision
    except (IntegrityError, sqlite3.IntegrityError, psycopg.errors.UniqueViolation) as exc:
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" not in str(exc):
            raise
        raise Duplicate(DUPLICATE) from None
    finally:
        progress.close()
    return report
