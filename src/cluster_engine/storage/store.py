"""Catalog persistence: SQLAlchemy Core queries over the tables in ``db.py``.

Every write happens in one transaction that first bumps ``catalog_state.revision`` (which also serializes
writers: the row lock is held until commit) and stamps the rows it touches with that revision. A reader
that has applied revision R asks for rows stamped above R, so it can follow the catalog incrementally.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..rules.catalog_entries import CatalogEntry
from ..schemas import ImageCreateReq, ImageResp, ImageType, json_encoder
from .db import audit_log, catalog_state, deleted_images, images
from .errors import Duplicate, ImageMissing
from .reads import StoreReads
from .records import (
    DUPLICATE,
    IMAGE_NOT_FOUND,
    NOTIFY_CHANNEL,
    Actor,
    Changes,
    ImportReport,
    Stored,
    _columns,
    _utc,
    image_of_body,
    make_image,
    namespace_of,
    utcnow,
)

# Statements of the write path, built once: SQLAlchemy then finds their compiled form by a cheap cache
# key, where a statement with its values inlined is rebuilt and keyed anew on every write.
_BUMP = (
    catalog_state.update()
    .where(catalog_state.c.id == 1)
    .values(revision=catalog_state.c.revision + 1)
    .returning(catalog_state.c.revision)
)
_INSERT_IMAGE = images.insert()
_INSERT_AUDIT = audit_log.insert()
_SELECT_IMAGE = sa.select(images).where(images.c.id == sa.bindparam("image_id"))
_SELECT_IMAGE_FOR_UPDATE = _SELECT_IMAGE.with_for_update()
_UPDATE_IMAGE = images.update().where(images.c.id == sa.bindparam("image_id"))
_DELETE_IMAGE = images.delete().where(images.c.id == sa.bindparam("image_id")).returning(images.c.body)


def _tombstone(insert: Callable[[sa.Table], Any]) -> Any:
    statement = insert(deleted_images)
    return statement.on_conflict_do_update(
        index_elements=[deleted_images.c.id], set_={"revision": statement.excluded.revision}
    )


_TOMBSTONE = {"sqlite": _tombstone(sqlite_insert), "postgresql": _tombstone(postgresql_insert)}


class Store(StoreReads):
    """The catalog's database: ``StoreReads`` (reads.py) and the writes, each one transaction that bumps the
    revision and, once committed, hands its change to ``on_commit``."""

    def _committed(
        self, began: float, revision: int, upserted: list[Stored], deleted: list[tuple[str, int]]
    ) -> None:
        self.committed_revision = max(self.committed_revision, revision)
        if self.on_commit is not None:
            self.on_commit(Changes(revision=revision, upserted=upserted, deleted=deleted), began)

    # --------------------------------------------------------------------------------------- writes

    async def _bump(self, conn: AsyncConnection) -> int:
        """Take the next revision; on PostgreSQL the row lock serializes writers until commit."""
        result = await conn.execute(_BUMP)
        revision = int(result.scalar_one())
        if self.is_postgres:  # delivered to listeners when (and only if) the transaction commits
            await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, str(revision))))
            # statement_timeout also covers COMMIT's wait for a synchronous standby, and cancelling that
            # wait commits locally with only a WARNING: we would acknowledge a write the standby may not
            # have. This transaction's COMMIT waits for the standby (or for the HA manager to drop it).
            await conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
        return revision

    @staticmethod
    async def _audit(
        conn: AsyncConnection,
        revision: int,
        actor: Actor,
        records: Sequence[tuple[str, uuid.UUID, dict[str, Any]]],
    ) -> None:
        if records:
            at = utcnow()
            rows = [
                {
                    "at": at,
                    "revision": revision,
                    "action": action,
                    "image_id": image_id,
                    "actor_org": actor.org_id,
                    "actor": actor.name,
                    "changes": changes,
                }
                for action, image_id, changes in records
            ]
            await conn.execute(_INSERT_AUDIT, rows[0] if len(rows) == 1 else rows)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[tuple[AsyncConnection, int]]:
        """One image write's transaction and its revision; a unique constraint it breaks is ``Duplicate``
        (the database decides duplicates: no check-then-write)."""
        try:
            async with self.engine.begin() as conn:
                yield conn, await self._bump(conn)
        except IntegrityError:
            raise Duplicate(DUPLICATE) from None

    @staticmethod
    async def _row(conn: AsyncConnection, image_id: uuid.UUID, *, lock: bool) -> Any:
        query = _SELECT_IMAGE_FOR_UPDATE if lock and conn.dialect.name == "postgresql" else _SELECT_IMAGE
        return (await conn.execute(query, {"image_id": image_id})).first()

    async def create_image(self, spec: ImageCreateReq, image_type: ImageType, actor: Actor) -> ImageResp:
        """Insert one image; the database's unique constraint decides duplicates (no check-then-insert)."""
        began = time.monotonic()
        now = utcnow()
        image = make_image(uuid.uuid4(), image_type, spec, now)
        async with self._writing() as (conn, revision):
            body = json_encoder.encode(image)
            values = {
                **_columns(spec),
                "type": image_type.value,
                "namespace": namespace_of(image_type, spec.orgId),
                "body": body,
            }
            await conn.execute(
                _INSERT_IMAGE,
                {"id": image.id, "created_at": now, "updated_at": now, "revision": revision, **values},
            )
            await self._audit(conn, revision, actor, [("create", image.id, _snapshot(image))])
        self._committed(began, revision, [(body, revision)], [])
        return image

    async def update_image(
        self, image_id: uuid.UUID, actor: Actor, change: Callable[[ImageResp], ImageCreateReq]
    ) -> ImageResp:
        """Apply ``change`` (it checks permission and validates, raising ApiErrors) to the current image."""
        began = time.monotonic()
        async with self._writing() as (conn, revision):
            row = await self._row(conn, image_id, lock=True)
            if row is None:
                raise ImageMissing(IMAGE_NOT_FOUND)
            before = image_of_body(row.body)
            spec = change(before)
            values = {**_columns(spec), "namespace": namespace_of(before.type, spec.orgId)}
            if all(_same(row._mapping[k], v) for k, v in values.items()):
                await conn.rollback()
                return before
            after = make_image(image_id, before.type, spec, before.createdAt)
            body = json_encoder.encode(after)
            await conn.execute(
                _UPDATE_IMAGE,
                {
                    "image_id": image_id,
                    "updated_at": utcnow(),
                    "revision": revision,
                    "body": body,
                    **values,
                },
            )
            await self._audit(conn, revision, actor, [("update", image_id, _diff(before, after))])
        self._committed(began, revision, [(body, revision)], [])
        return after

    async def delete_image(
        self, image_id: uuid.UUID, actor: Actor, check: Callable[[ImageResp], None]
    ) -> ImageResp:
        """Delete one image after ``check`` (permission) passes on its state (a failing check rolls the
        deletion back), leaving a tombstone that the read models of other processes pick up."""
        began = time.monotonic()
        async with self.engine.begin() as conn:
            revision = await self._bump(conn)
            body = (await conn.execute(_DELETE_IMAGE, {"image_id": image_id})).scalar_one_or_none()
            if body is None:
                raise ImageMissing(IMAGE_NOT_FOUND)
            image = image_of_body(body)
            check(image)
            await conn.execute(_TOMBSTONE[conn.dialect.name], {"id": image_id, "revision": revision})
            await self._audit(conn, revision, actor, [("delete", image_id, _snapshot(image))])
        self._committed(began, revision, [], [(str(image_id), revision)])
        return image

    async def import_catalog(
        self,
        entries: Iterable[CatalogEntry],
        *,
        dry_run: bool = False,
        prune: bool = False,
        actor: Actor | None = None,
    ) -> ImportReport:
        """Create or update every entry (and with ``prune`` delete Public images absent from the file) in
        one transaction; idempotent: a second run changes nothing and takes no revision. See
        ``catalog_files`` (which also imports files as they are read)."""
        from . import catalog_files

        return await catalog_files.import_entries(self, entries, dry_run=dry_run, prune=prune, actor=actor)


def _snapshot(image: ImageResp) -> dict[str, Any]:
    return msgspec.to_builtins(image)  # type: ignore[no-any-return]


def _diff(before: ImageResp, after: ImageResp) -> dict[str, Any]:
    old, new = _snapshot(before), _snapshot(after)
    return {key: {"from": old[key], "to": new[key]} for key in new if old.get(key) != new[key]}


def _same(stored: Any, wanted: Any) -> bool:
    if isinstance(stored, dt.datetime) and isinstance(wanted, dt.datetime):
        return _utc(stored) == _utc(wanted)
    return bool(stored == wanted)


@contextlib.asynccontextmanager
async def opened(url: str, *, statement_timeout: float | None = 5.0) -> AsyncIterator[Store]:
    """A store on ``url`` for the block, closed after it (also when the block fails): for the CLI's commands,
    the pytest plugin and tests. ``statement_timeout``: as ``db.create_engine``'s (None: none)."""
    store = Store.open(url, statement_timeout=statement_timeout)
    try:
        yield store
    finally:
        await store.close()
