"""The import's writes in SQL, one class per dialect: the index query, row inserts and updates, audit rows."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import sqlalchemy as sa

from ..db import audit_log, images
from .planning import ExistingIndex, Write
from .progress import Progress
from .shared import body_digest

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from ..records import Actor

ID_BATCH = 500  # ids per IN (…) on SQLite

# The images columns in table order: every row value tuple below follows it (a test checks it).
IMAGE_COLUMNS = (
    "id",
    "type",
    "org_id",
    "namespace",
    "idc",
    "name",
    "path",
    "os_series",
    "os_version",
    "os_architecture",
    "boot_mode",
    "system_disk_size",
    "icon",
    "default_partition_table",
    "supported_products",
    "created_at",
    "updated_at",
    "revision",
    "body",
)
AUDIT_COLUMNS = ("at", "revision", "action", "image_id", "actor_org", "actor", "changes")


def _same(value: Any) -> Any:
    return value


class _Database:
    """An import's statements on one backend, on the driver's own connection, inside the transaction
    SQLAlchemy began (SQLAlchemy's per-row work would cost more than the database's here). Values are
    adapted as SQLAlchemy's column types adapt them (their own bind processors where they have one), so
    rows are stored exactly as the other writes store them."""

    def __init__(self, driver: Any, dialect: sa.Dialect) -> None:
        self.driver, self.dialect = driver, dialect
        columns = images.c

        def processor(column: sa.Column[Any]) -> Callable[[Any], Any]:
            return column.type.bind_processor(dialect) or _same

        self.uuid = processor(columns.id)
        self.when = processor(columns.created_at)
        self.json = json.dumps  # what SQLAlchemy's JSON type writes, on either backend
        self.tables: dict[tuple[int, ...], tuple[list[Any], str]] = {}
        self.products: dict[tuple[str, ...], str] = {}

    def image_rows(self, writes: list[Write], revision: int, now: dt.datetime) -> list[tuple[Any, ...]]:
        uuid_value, when, tables, products = self.uuid, self.when, self.tables, self.products
        updated_at = when(now)
        rows = []
        for write in writes:
            spec = write.entry.spec
            # the JSON columns repeat across a catalog: rendered once per distinct value (the partitions
            # are the validator's shared objects, kept alive here, so their ids stand for them)
            key = tuple(map(id, spec.DefaultPartitionTable))
            table = tables.get(key)
            if table is None or table[0] != spec.DefaultPartitionTable:
                if len(tables) >= 4096:
                    tables.clear()
                table = tables[key] = (
                    list(spec.DefaultPartitionTable),
                    self.json(msgspec.to_builtins(spec.DefaultPartitionTable)),
                )
            product_key = tuple(spec.supportedProducts)
            product_text = products.get(product_key)
            if product_text is None:
                if len(products) >= 4096:
                    products.clear()
                product_text = products[product_key] = self.json(spec.supportedProducts)
            rows.append(
                (
                    uuid_value(write.image_id),
                    write.entry.type.value,
                    uuid_value(spec.orgId),
                    write.namespace,
                    spec.idc,
                    spec.name,
                    spec.path,
                    spec.OSSeries,
                    spec.OSVersion,
                    spec.OSArchitecture,
                    spec.BootMode.value,
                    spec.SystemDiskSize,
                    spec.icon,
                    table[1],
                    product_text,
                    when(write.created_at) if write.set_created else None,
                    updated_at,
                    revision,
                    write.body,
                )
            )
        return rows

    def audit_rows(
        self,
        at: dt.datetime,
        revision: int,
        action: str,
        actor: Actor,
        changes: Iterable[tuple[uuid.UUID, str]],
    ) -> list[tuple[Any, ...]]:
        """Audit rows for (image id, changes as JSON text)."""
        when, org, image = self.when(at), None if actor.org_id is None else self.uuid(actor.org_id), self.uuid
        return [(when, revision, action, image(i), org, actor.name, text) for i, text in changes]

    async def prepare(self) -> None:
        """Before the first statement."""

    async def done(self) -> None:
        """After the last statement (also when the import fails)."""

    def index_rows(self) -> AsyncIterator[list[tuple[Any, ...]]]:
        raise NotImplementedError

    async def load_index(self, progress: Progress) -> ExistingIndex:
        index = ExistingIndex()
        async for rows in self.index_rows():
            for image_id, namespace, idc, name, created_at, digest in rows:
                index.add(image_id, namespace, idc, name, digest, created_at)
            progress.update(f"{len(index):,}")
        return index

    async def create(self, writes: list[Write], revision: int, now: dt.datetime, actor: Actor) -> None:
        """Insert these new images, and their audit rows (a create records the whole new image: its
        served JSON)."""
        raise NotImplementedError

    async def update(self, writes: list[Write], revision: int, now: dt.datetime) -> None:
        """Write these images' new values (their audit rows are the caller's: it has their diffs)."""
        raise NotImplementedError

    async def bodies(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        raise NotImplementedError

    async def move_away(self, ids: list[uuid.UUID]) -> None:
        """Give these images names no entry can have ("~" is never in a name), so that names can move
        between images (swapped in one file) without ever being held twice."""
        raise NotImplementedError

    async def delete(self, ids: list[uuid.UUID], revision: int) -> list[tuple[uuid.UUID, bytes]]:
        """Delete these images (recording them in deleted_images); their ids and bodies."""
        raise NotImplementedError

    async def audit(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class _Sqlite(_Database):
    # the page cache an import may use (the table and its indexes are written at random places)
    CACHE_KIB = 131072
    ROWS_PER_INSERT = 400  # 7,600 parameters at most (SQLite allows 32,766)

    async def prepare(self) -> None:
        await self.driver.execute(f"PRAGMA cache_size = -{self.CACHE_KIB}")

    async def done(self) -> None:
        await self.driver.execute("PRAGMA cache_size = -2000")  # SQLite's default

    async def index_rows(self) -> AsyncIterator[list[tuple[Any, ...]]]:
        cursor = await self.driver.execute("SELECT id, namespace, idc, name, created_at, body FROM images")
        try:
            while rows := await cursor.fetchmany(5000):
                yield [
                    (
                        int(raw_id, 16) if len(raw_id) == 32 else uuid.UUID(raw_id).int,
                        namespace,
                        idc,
                        name,
                        _sqlite_time(created_at),
                        body_digest(body if isinstance(body, bytes) else bytes(body, "utf-8")),
                    )
                    for raw_id, namespace, idc, name, created_at, body in rows
                ]
        finally:
            await cursor.close()

    async def _insert(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        # Many rows per statement: SQLite then inserts them without taking Python's lock back for every
        # row (each step of an executemany waits for it, and the file is being parsed meanwhile).
        per = self.ROWS_PER_INSERT
        head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
        row = f"({_placeholders(len(columns))})"
        whole = len(rows) - len(rows) % per
        if whole:
            await self.driver.executemany(
                head + ",".join([row] * per),
                [tuple(itertools.chain.from_iterable(rows[i : i + per])) for i in range(0, whole, per)],
            )
        if whole < len(rows):
            rest = rows[whole:]
            values = tuple(itertools.chain.from_iterable(rest))
            await self.driver.execute(head + ",".join([row] * len(rest)), values)

    async def create(self, writes: list[Write], revision: int, now: dt.datetime, actor: Actor) -> None:
        await self._insert("images", IMAGE_COLUMNS, self.image_rows(writes, revision, now))
        changes = [(w.image_id, w.body.decode()) for w in writes]
        await self._insert(
            "audit_log", AUDIT_COLUMNS, self.audit_rows(now, revision, "create", actor, changes)
        )

    async def update(self, writes: list[Write], revision: int, now: dt.datetime) -> None:
        rows = self.image_rows(writes, revision, now)  # a None created_at keeps the stored one
        sets = ", ".join(
            f"{name} = COALESCE(?, created_at)" if name == "created_at" else f"{name} = ?"
            for name in IMAGE_COLUMNS[1:]
        )
        await self.driver.executemany(
            f"UPDATE images SET {sets} WHERE id = ?", [(*row[1:], row[0]) for row in rows]
        )

    async def bodies(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        found: dict[uuid.UUID, bytes] = {}
        for start in range(0, len(ids), ID_BATCH):
            chunk = [self.uuid(i) for i in ids[start : start + ID_BATCH]]
            sql = f"SELECT id, body FROM images WHERE id IN ({_placeholders(len(chunk))})"
            for raw_id, body in await self.driver.execute_fetchall(sql, chunk):
                found[uuid.UUID(raw_id)] = bytes(body)
        return found

    async def move_away(self, ids: list[uuid.UUID]) -> None:
        await self.driver.executemany(
            "UPDATE images SET name = ? WHERE id = ?", [(f"~{i}", self.uuid(i)) for i in ids]
        )

    async def delete(self, ids: list[uuid.UUID], revision: int) -> list[tuple[uuid.UUID, bytes]]:
        gone: list[tuple[uuid.UUID, bytes]] = []
        for start in range(0, len(ids), ID_BATCH):
            chunk = [self.uuid(i) for i in ids[start : start + ID_BATCH]]
            marks = _placeholders(len(chunk))
            rows = await self.driver.execute_fetchall(
                f"DELETE FROM images WHERE id IN ({marks}) RETURNING id, body", chunk
            )
            gone += [(uuid.UUID(raw_id), bytes(body)) for raw_id, body in rows]
            await self.driver.execute(f"DELETE FROM deleted_images WHERE id IN ({marks})", chunk)
            await self.driver.executemany(
                "INSERT INTO deleted_images (id, revision) VALUES (?, ?)", [(i, revision) for i in chunk]
            )
        return gone

    async def audit(self, rows: list[tuple[Any, ...]]) -> None:
        await self._insert("audit_log", AUDIT_COLUMNS, rows)


def _sqlite_time(value: Any) -> dt.datetime:
    # SQLAlchemy keeps naive UTC as "YYYY-MM-DD HH:MM:SS.ffffff" on SQLite
    parsed = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


_UPDATES = "cluster_engine_catalog_updates"


def _pg_type(column: sa.Column[Any], dialect: sa.Dialect) -> str:
    """The column's type as psycopg names it (for binary COPY)."""
    name = column.type.compile(dialect=dialect).lower()
    # JSON columns are given their text (json's binary form is its text)
    known = {"timestamp with time zone": "timestamptz", "bigint": "int8", "json": "text"}
    return known.get(name, name.split("(")[0])


class _Postgres(_Database):
    """Binary COPY for every bulk write; updates go through a temporary table."""

    updates_table = False

    async def index_rows(self) -> AsyncIterator[list[tuple[Any, ...]]]:
        async with self.driver.cursor(name="cluster_engine_catalog_index") as cursor:
            await cursor.execute("SELECT id, namespace, idc, name, created_at, md5(body) FROM images")
            while rows := await cursor.fetchmany(10000):
                yield [
                    (image_id.int, namespace, idc, name, created_at, bytes.fromhex(digest))
                    for image_id, namespace, idc, name, created_at, digest in rows
                ]

    async def _copy(self, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> None:
        # binary: a quarter of the client's work of the text format (bytea above all)
        source = audit_log if table == "audit_log" else images  # (the updates table is images' twin)
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        async with self.driver.cursor() as cursor, cursor.copy(statement) as copy:
            copy.set_types([_pg_type(source.c[name], self.dialect) for name in columns])
            for row in rows:
                await copy.write_row(row)

    async def create(self, writes: list[Write], revision: int, now: dt.datetime, actor: Actor) -> None:
        await self._copy("images", IMAGE_COLUMNS, self.image_rows(writes, revision, now))
        changes = [(w.image_id, w.body.decode()) for w in writes]
        await self._copy("audit_log", AUDIT_COLUMNS, self.audit_rows(now, revision, "create", actor, changes))

    async def update(self, writes: list[Write], revision: int, now: dt.datetime) -> None:
        if not self.updates_table:
            await self.driver.execute(
                f"CREATE TEMPORARY TABLE {_UPDATES} ON COMMIT DROP AS SELECT * FROM images WITH NO DATA"
            )
            self.updates_table = True
        else:
            await self.driver.execute(f"TRUNCATE {_UPDATES}")
        await self._copy(_UPDATES, IMAGE_COLUMNS, self.image_rows(writes, revision, now))
        sets = ", ".join(
            "created_at = COALESCE(u.created_at, i.created_at)"
            if name == "created_at"
            else f"{name} = u.{name}"
            for name in IMAGE_COLUMNS[1:]
        )
        await self.driver.execute(f"UPDATE images AS i SET {sets} FROM {_UPDATES} AS u WHERE i.id = u.id")

    async def bodies(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        cursor = await self.driver.execute("SELECT id, body FROM images WHERE id = ANY(%s)", (ids,))
        return {image_id: bytes(body) for image_id, body in await cursor.fetchall()}

    async def move_away(self, ids: list[uuid.UUID]) -> None:
        await self.driver.execute("UPDATE images SET name = '~' || id::text WHERE id = ANY(%s)", (ids,))

    async def delete(self, ids: list[uuid.UUID], revision: int) -> list[tuple[uuid.UUID, bytes]]:
        cursor = await self.driver.execute("DELETE FROM images WHERE id = ANY(%s) RETURNING id, body", (ids,))
        gone = [(image_id, bytes(body)) for image_id, body in await cursor.fetchall()]
        await self.driver.execute("DELETE FROM deleted_images WHERE id = ANY(%s)", (ids,))
        await self.driver.execute(
            "INSERT INTO deleted_images (id, revision) SELECT unnest(%s::uuid[]), %s", (ids, revision)
        )
        return gone

    async def audit(self, rows: list[tuple[Any, ...]]) -> None:
        await self._copy("audit_log", AUDIT_COLUMNS, rows)


async def _database(conn: AsyncConnection) -> _Database:
    driver = (await conn.get_raw_connection()).driver_connection
    if conn.dialect.name == "postgresql":
        return _Postgres(driver, conn.dialect)
    return _Sqlite(driver, conn.dialect)
