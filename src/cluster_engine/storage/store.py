"""Catalog persistence: SQLAlchemy Core queries over the tables in ``db.py``.

Every write happens in one transaction that first bumps ``catalog_state.revision`` (which also serializes
writers: the row lock is held until commit) and stamps the rows it touches with that revision. A reader
that has applied revision R asks for rows stamped above R, so it can follow the catalog incrementally.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..schemas import ImageCreateReq, ImageResp, ImageType, Partition, json_encoder
from ..server.catalog_entries import CatalogEntry
from ..server.errors import Conflict, NotFound
from .db import audit_log, catalog_state, create_engine, deleted_images, images, uses_pgbouncer
from .standby import Standby, current_revision

PUBLIC_NAMESPACE = "public"
IMAGE_NOT_FOUND = "image not found"
DUPLICATE = "an image with this name already exists in this idc for this owner"
NOTIFY_CHANNEL = "cluster_engine_catalog"


def namespace_of(image_type: ImageType, org_id: uuid.UUID) -> str:
    return PUBLIC_NAMESPACE if image_type is ImageType.PUBLIC else str(org_id)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


_image_decoder = msgspec.json.Decoder(ImageResp)


def image_of_body(body: bytes) -> ImageResp:
    """The image as stored in its row's ``body`` (the served JSON)."""
    return _image_decoder.decode(body)


def make_image(
    image_id: uuid.UUID, image_type: ImageType, spec: ImageCreateReq, created_at: dt.datetime
) -> ImageResp:
    """The image as it will be served, from its validated fields (before it is written)."""
    return ImageResp(
        id=image_id,
        type=image_type,
        orgId=spec.orgId,
        idc=spec.idc,
        name=spec.name,
        path=spec.path,
        OSSeries=spec.OSSeries,
        OSVersion=spec.OSVersion,
        OSArchitecture=spec.OSArchitecture,
        BootMode=spec.BootMode,
        SystemDiskSize=spec.SystemDiskSize,
        DefaultPartitionTable=list(spec.DefaultPartitionTable),
        icon=spec.icon,
        supportedProducts=list(spec.supportedProducts),
        createdAt=_utc(created_at),
    )


def image_from_row(row: Any) -> ImageResp:
    return ImageResp(
        id=row.id,
        type=ImageType(row.type),
        orgId=row.org_id,
        idc=row.idc,
        name=row.name,
        path=row.path,
        OSSeries=row.os_series,
        OSVersion=row.os_version,
        OSArchitecture=row.os_architecture,
        BootMode=row.boot_mode,
        SystemDiskSize=row.system_disk_size,
        DefaultPartitionTable=msgspec.convert(row.default_partition_table, list[Partition]),
        icon=row.icon,
        supportedProducts=list(row.supported_products),
        createdAt=_utc(row.created_at),
    )


def _columns(spec: ImageCreateReq) -> dict[str, Any]:
    """The mutable columns of an image, from its validated create request."""
    return {
        "org_id": spec.orgId,
        "idc": spec.idc,
        "name": spec.name,
        "path": spec.path,
        "os_series": spec.OSSeries,
        "os_version": spec.OSVersion,
        "os_architecture": spec.OSArchitecture,
        "boot_mode": spec.BootMode.value,
        "system_disk_size": spec.SystemDiskSize,
        "icon": spec.icon,
        "default_partition_table": msgspec.to_builtins(spec.DefaultPartitionTable),
        "supported_products": list(spec.supportedProducts),
    }


# An image as stored: its served JSON (``images.body``) and the revision that last wrote it.
Stored = tuple[bytes, int]


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed after a given revision, up to and including ``revision``.

    ``upserted`` holds images as they are now, each with the revision that last wrote it; ``deleted``
    the ids deleted with the revision that deleted them. Applying them is idempotent.
    """

    revision: int
    upserted: list[Stored]
    deleted: list[tuple[str, int]]  # (canonical id, revision)


@dataclass(frozen=True, slots=True)
class Namespace:
    """All images of some namespaces (Public, or orgs' Customized) as of at least ``revision``."""

    revision: int
    images: list[Stored]


# An org load: the revision row (body NULL) and the namespaces' images, in one statement (one snapshot).
# The unique index (namespace, idc, name) serves the namespace lookup.
_LOAD_SQLITE = (
    "SELECT NULL, revision FROM catalog_state WHERE id = 1"
    " UNION ALL SELECT body, revision FROM images WHERE namespace IN ({marks})"
)
_LOAD_POSTGRES = (
    "SELECT NULL::bytea, revision FROM catalog_state WHERE id = 1"
    " UNION ALL SELECT body, revision FROM images WHERE namespace = ANY(%s)"
)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change, for the audit trail."""

    org_id: uuid.UUID | None
    name: str | None


class Ids(Sequence[uuid.UUID]):
    """Image ids, 16 bytes each (an import's report may hold millions)."""

    def __init__(self, ids: Iterable[uuid.UUID] = ()) -> None:
        self._raw = bytearray()
        self.extend(ids)

    def append(self, image_id: uuid.UUID) -> None:
        self._raw += image_id.bytes

    def extend(self, ids: Iterable[uuid.UUID]) -> None:
        for image_id in ids:
            self._raw += image_id.bytes

    def __len__(self) -> int:
        return len(self._raw) // 16

    @overload
    def __getitem__(self, index: int) -> uuid.UUID: ...
    @overload
    def __getitem__(self, index: slice) -> list[uuid.UUID]: ...
    def __getitem__(self, index: int | slice) -> uuid.UUID | list[uuid.UUID]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return uuid.UUID(bytes=bytes(self._raw[16 * index : 16 * index + 16]))

    def __iter__(self) -> Iterator[uuid.UUID]:
        raw = self._raw
        for start in range(0, len(raw), 16):
            yield uuid.UUID(bytes=bytes(raw[start : start + 16]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{len(self)} image ids>"  # asyncio reprs what a command returns: never list millions


@dataclass(slots=True)
class ImportReport:
    created: Ids = field(default_factory=Ids)
    updated: Ids = field(default_factory=Ids)
    unchanged: Ids = field(default_factory=Ids)
    deleted: Ids = field(default_factory=Ids)
    revision: int | None = None

    def summary(self) -> dict[str, int]:
        return {
            "created": len(self.created),
            "updated": len(self.updated),
            "unchanged": len(self.unchanged),
            "deleted": len(self.deleted),
        }


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


class Store:
    """The catalog's database. With a ``standby`` (CE_DATABASE_READ_URL), change polling and org loads
    read from it whenever it proves it is current (see standby.py); everything else uses ``engine``."""

    def __init__(self, engine: AsyncEngine, url: str, *, standby: Standby | None = None) -> None:
        self.engine = engine
        self.url = url
        self.is_postgres = engine.dialect.name == "postgresql"
        self.pgbouncer = uses_pgbouncer(url)  # a transaction-pooling PgBouncer: see db.create_engine
        self.standby = standby
        # Called with each write's own change once it has committed (the app hands it to this process's
        # read model: read-your-writes without reading the database again).
        # Its second argument is a time.monotonic() from before the write began: when the write committed,
        # the catalog was at its revision (writers take revisions in turn and hold them until commit).
        self.on_commit: Callable[[Changes, float], None] | None = None
        self.committed_revision = 0  # the newest revision a write of this process committed

    def _committed(
        self, began: float, revision: int, upserted: list[Stored], deleted: list[tuple[str, int]]
    ) -> None:
        self.committed_revision = max(self.committed_revision, revision)
        if self.on_commit is not None:
            self.on_commit(Changes(revision=revision, upserted=upserted, deleted=deleted), began)

    @classmethod
    def open(cls, url: str, *, statement_timeout: float | None = 5.0) -> Store:
        return cls(create_engine(url, statement_timeout=statement_timeout), url)

    async def notifications(self) -> AsyncIterator[str]:
        """PostgreSQL only: yield the payload (a revision) of every catalog change committed anywhere."""
        import psycopg

        # The engine's own connect arguments: the same hosts (several, for a failover pair, with their
        # target_session_attrs), user and options as the pool's connections.
        _, params = self.engine.dialect.create_connect_args(self.engine.url)
        params.pop("context", None)
        params["connect_timeout"] = 2
        async with await psycopg.AsyncConnection.connect(autocommit=True, **params) as conn:
            await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            async for notify in conn.notifies():
                yield notify.payload

    async def close(self) -> None:
        if self.standby is not None:
            await self.standby.close()
        await self.engine.dispose()

    # ---------------------------------------------------------------------------------------- reads

    async def revision(self) -> int:
        """The catalog's current revision, on the primary (what a standby read must reach)."""
        async with self.engine.connect() as conn:
            return await current_revision(conn)

    _current_revision = staticmethod(current_revision)

    async def changes_since(self, since: int) -> Changes:
        """Everything committed after revision ``since``, up to the current revision (at least the
        primary's at the call: from the standby only when it has replayed that far)."""
        standby = self.standby
        if standby is None:
            async with self.engine.connect() as conn:
                return await self._changes(await self._polling(conn), since)
        target = await self.revision()
        if target == since:
            await standby.recheck(target)
            return Changes(revision=since, upserted=[], deleted=[])
        changes = await standby.read(self.engine, target, lambda conn: self._changes(conn, since))
        standby.note(changes.revision)
        return changes

    async def _polling(self, conn: AsyncConnection) -> AsyncConnection:
        """A poll's connection: directly on PostgreSQL in autocommit, so that a poll that finds nothing
        new is one round trip (no BEGIN, no ROLLBACK). Its reads need no common snapshot: each one is
        bounded by the revision read first, and all revisions up to it are committed (writers take them
        in turn under catalog_state's row lock); a change committed meanwhile is fetched by the next poll.
        Through PgBouncer every transaction must begin READ WRITE (db._through_pgbouncer: how a demoted
        node is noticed), so polls there stay transactions."""
        if self.is_postgres and not self.pgbouncer:
            return await conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    async def _changes(self, conn: AsyncConnection, since: int) -> Changes:
        revision = await self._current_revision(conn)
        if revision == since:
            return Changes(revision=since, upserted=[], deleted=[])
        window = (since, revision)
        rows = (
            await conn.execute(
                sa.select(images.c.body, images.c.revision).where(
                    images.c.revision > window[0], images.c.revision <= window[1]
                )
            )
        ).all()
        deleted = (
            await conn.execute(
                sa.select(deleted_images.c.id, deleted_images.c.revision).where(
                    deleted_images.c.revision > window[0], deleted_images.c.revision <= window[1]
                )
            )
        ).all()
        return Changes(
            revision=revision,
            upserted=[(r.body, int(r.revision)) for r in rows],
            deleted=[(str(r.id), int(r.revision)) for r in deleted],
        )

    async def load_namespace(self, namespace: str) -> Namespace:
        """Every image of a namespace; rows written up to the returned revision are all included, and
        that revision is at least the primary's at the call (the catalog's first load confirms freshness
        with it)."""
        if self.standby is None:
            return await self.load_namespaces([namespace])
        target = await self.revision()
        return await self._load_from_standby(self.standby, [namespace], target)

    async def load_namespaces(self, namespaces: Sequence[str]) -> Namespace:
        """Every image of these namespaces and the revision they are complete for, in one statement (so
        one snapshot, one round trip) on the driver's own connection: this is the cold path of an org's
        first request, and SQLAlchemy's layers cost more than the query itself here. From a standby, at
        least at the highest revision this process has seen (the catalog's, which these images join)."""
        standby = self.standby
        if standby is None:
            async with self.engine.connect() as conn:
                return await self._load(conn, namespaces)
        return await self._load_from_standby(standby, namespaces, standby.floor)

    async def _load_from_standby(self, standby: Standby, namespaces: Sequence[str], target: int) -> Namespace:
        loaded = await standby.read(self.engine, target, lambda conn: self._load(conn, namespaces))
        standby.note(loaded.revision)
        return loaded

    async def _load(self, conn: AsyncConnection, namespaces: Sequence[str]) -> Namespace:
        pooled = self.standby.pgbouncer if self.standby and self.standby.owns(conn) else self.pgbouncer
        if pooled:  # the engine's BEGIN (READ WRITE, or READ ONLY on a standby) and statement timeout
            await conn.begin()
        driver: Any = (await conn.get_raw_connection()).driver_connection
        if self.is_postgres:
            cursor = await driver.execute(_LOAD_POSTGRES, (list(namespaces),))
            rows = await cursor.fetchall()
        else:
            marks = ",".join("?" * len(namespaces))
            rows = await driver.execute_fetchall(_LOAD_SQLITE.format(marks=marks), tuple(namespaces))
        revision = None
        stored: list[Stored] = []
        for body, row_revision in rows:
            if body is None:
                revision = int(row_revision)
            else:
                stored.append((bytes(body), int(row_revision)))
        if revision is None:
            raise RuntimeError("catalog_state is empty: the database is not migrated")
        return Namespace(revision=revision, images=stored)

    async def customized(
        self, batch: int = 10_000
    ) -> AsyncGenerator[tuple[int, list[tuple[str, Stored]]], None]:
        """Every Customized image, grouped by org namespace in namespace order, in batches that never split
        an org: (revision, [(namespace, stored)…]). Rows written up to the first batch's revision are all
        included; for warm starts (see ``Catalog.preload``). From a standby, at least at the highest
        revision this process has seen."""
        reading = (
            self.engine.connect()
            if self.standby is None
            else self.standby.connection(self.engine, self.standby.floor or await self.revision())
        )
        async with reading as conn:
            revision = await self._current_revision(conn)
            if self.standby is not None:
                self.standby.note(revision)
            query = (
                sa.select(images.c.namespace, images.c.body, images.c.revision)
                .where(images.c.namespace != PUBLIC_NAMESPACE)
                .order_by(images.c.namespace)
            )
            result = await conn.stream(query.execution_options(yield_per=batch))
            pending: list[tuple[str, Stored]] = []
            async for rows in result.partitions(batch):
                for row in rows:
                    pending.append((row.namespace, (row.body, int(row.revision))))
                last = pending[-1][0]
                cut = len(pending)
                while cut and pending[cut - 1][0] == last:  # keep the last org whole for the next batch
                    cut -= 1
                if cut:
                    yield revision, pending[:cut]
                    del pending[:cut]
            if pending:
                yield revision, pending

    async def schema_revision(self) -> str | None:
        """The migration the database is at (None before the first)."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
        return None if value is None else str(value)

    def pool_in_use(self) -> int:
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return int(checkedout()) if callable(checkedout) else 0

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(images)) or 0)

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

    @staticmethod
    async def _row(conn: AsyncConnection, image_id: uuid.UUID, *, lock: bool) -> Any:
        query = _SELECT_IMAGE_FOR_UPDATE if lock and conn.dialect.name == "postgresql" else _SELECT_IMAGE
        return (await conn.execute(query, {"image_id": image_id})).first()

    async def create_image(self, spec: ImageCreateReq, image_type: ImageType, actor: Actor) -> ImageResp:
        """Insert one image; the database's unique constraint decides duplicates (no check-then-insert)."""
        began = time.monotonic()
        now = utcnow()
        image = make_image(uuid.uuid4(), image_type, spec, now)
        try:
            async with self.engine.begin() as conn:
                revision = await self._bump(conn)
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
        except IntegrityError:
            raise Conflict(DUPLICATE) from None
        self._committed(began, revision, [(body, revision)], [])
        return image

    async def update_image(
        self, image_id: uuid.UUID, actor: Actor, change: Callable[[ImageResp], ImageCreateReq]
    ) -> ImageResp:
        """Apply ``change`` (it checks permission and validates, raising ApiErrors) to the current image."""
        began = time.monotonic()
        try:
            async with self.engine.begin() as conn:
                revision = await self._bump(conn)
                row = await self._row(conn, image_id, lock=True)
                if row is None:
                    raise NotFound(IMAGE_NOT_FOUND)
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
        except IntegrityError:
            raise Conflict(DUPLICATE) from None
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
                raise NotFound(IMAGE_NOT_FOUND)
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

    async def export_catalog(self) -> list[ImageResp]:
        """Every image, in (createdAt, id) order (``catalog_files.export_catalog`` streams them to a file)."""
        async with self.engine.connect() as conn:
            query = sa.select(images.c.body).order_by(images.c.created_at, images.c.id)
            result = await conn.stream(query.execution_options(yield_per=2000))
            return [image_of_body(row.body) async for row in result]

    async def audit_entries(
        self, *, since: dt.datetime | None = None, image_id: uuid.UUID | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        query = sa.select(audit_log).order_by(audit_log.c.seq.desc()).limit(limit)
        if since is not None:  # SQLite keeps naive UTC: compare in UTC on every backend
            query = query.where(audit_log.c.at >= since.astimezone(dt.UTC))
        if image_id is not None:
            query = query.where(audit_log.c.image_id == image_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            {
                "at": _utc(row.at).isoformat(),
                "revision": row.revision,
                "action": row.action,
                "imageId": str(row.image_id),
                "actorOrg": str(row.actor_org) if row.actor_org else None,
                "actor": row.actor,
                "changes": row.changes,
            }
            for row in reversed(rows)
        ]


def _snapshot(image: ImageResp) -> dict[str, Any]:
    return msgspec.to_builtins(image)  # type: ignore[no-any-return]


def _diff(before: ImageResp, after: ImageResp) -> dict[str, Any]:
    old, new = _snapshot(before), _snapshot(after)
    return {key: {"from": old[key], "to": new[key]} for key in new if old.get(key) != new[key]}


def _same(stored: Any, wanted: Any) -> bool:
    if isinstance(stored, dt.datetime) and isinstance(wanted, dt.datetime):
        return _utc(stored) == _utc(wanted)
    return bool(stored == wanted)
