"""The store's connection and its reads: revisions and changes (for the read model), org loads (from a
current standby when there is one), counts, the export and the audit trail. ``Store`` (store.py) adds the
writes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..schemas import ImageResp
from .db import audit_log, create_engine, deleted_images, images, uses_pgbouncer
from .onetrip import changes_in_one_trip, revision_in_one_trip, select_in_one_trip
from .records import NOTIFY_CHANNEL, PUBLIC_NAMESPACE, Changes, Namespace, Stored, _utc, image_of_body
from .standby import Standby, current_revision

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


class StoreReads:
    """The catalog's database, read side. With a ``standby`` (CE_DATABASE_READ_URL), change polling and org
    loads read from it whenever it proves it is current (see standby.py); everything else uses ``engine``."""

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

    @classmethod
    def open(cls, url: str, *, statement_timeout: float | None = 5.0) -> Self:
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
            if self.pgbouncer:
                return await revision_in_one_trip(conn)
            return await current_revision(conn)

    _current_revision = staticmethod(current_revision)

    async def changes_since(self, since: int, upto: int | None = None) -> Changes:
        """Everything committed after revision ``since``, up to the current revision (at least the
        primary's at the call: from the standby only when it has replayed that far), or up to ``upto``, a
        revision read from the primary already (another worker's poll: revisionboard.py)."""
        standby = self.standby
        if standby is None:
            async with self.engine.connect() as conn:
                if not self.pgbouncer:
                    return await self._changes(await self._polling(conn), since, upto=upto)
                # one round trip for a poll's usual answer, and one more for the changes when there are
                revision = await revision_in_one_trip(conn) if upto is None else upto
                if revision == since:
                    return Changes(revision=since, upserted=[], deleted=[])
                rows, deleted = await changes_in_one_trip(conn, since, revision)
                return Changes(
                    revision=revision,
                    upserted=[(bytes(body), int(at)) for body, at in rows],
                    deleted=[(str(image_id), int(at)) for image_id, at in deleted],
                )
        target = await self.revision() if upto is None else upto
        if target == since:
            await standby.recheck(target)
            return Changes(revision=since, upserted=[], deleted=[])
        changes = await standby.read(self.engine, target, lambda conn: self._changes(conn, since, upto=upto))
        standby.note(changes.revision)
        return changes

    async def _polling(self, conn: AsyncConnection) -> AsyncConnection:
        """A poll's connection: directly on PostgreSQL in autocommit, so that a poll that finds nothing
        new is one round trip (no BEGIN, no ROLLBACK). Its reads need no common snapshot: each one is
        bounded by the revision read first, and all revisions up to it are committed (writers take them
        in turn under catalog_state's row lock); a change committed meanwhile is fetched by the next poll.
        Through PgBouncer every transaction must begin READ WRITE (connections.through_pgbouncer: how a
        demoted node is noticed), so polls there stay transactions (one simple query each: onetrip.py)."""
        if self.is_postgres and not self.pgbouncer:
            return await conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn

    async def _changes(self, conn: AsyncConnection, since: int, *, upto: int | None = None) -> Changes:
        """The changes in (``since``, the current revision], or (``since``, ``upto``] when the revision was
        read already: every revision up to one read is committed (see ``_polling``)."""
        revision = await self._current_revision(conn) if upto is None else upto
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
        if pooled:  # the engine's BEGIN (READ WRITE, or READ ONLY on a standby), the load and COMMIT at once
            rows = await select_in_one_trip(conn, _LOAD_POSTGRES, [list(namespaces)])
        elif self.is_postgres:
            driver: Any = (await conn.get_raw_connection()).driver_connection
            cursor = await driver.execute(_LOAD_POSTGRES, (list(namespaces),))
            rows = await cursor.fetchall()
        else:
            driver = (await conn.get_raw_connection()).driver_connection
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
