"""Read transactions in one round trip through a transaction-pooling PgBouncer.

PgBouncer lends a client one of its few server connections from the transaction's first statement to its
end. Through SQLAlchemy a read is several round trips (the engine's ``BEGIN READ WRITE; SET LOCAL …``,
each SELECT, the ROLLBACK), and the server connection stays lent for all of them and for the worker's
scheduling gaps between them: on a machine running a fleet's hundred workers that is tens of
milliseconds each, for a query the server answers in a fraction of one, and a pool of 20 connections
shared by the fleet's polls and org loads runs dry. Here the BEGIN, the SELECTs and the COMMIT go as one
simple query (no parameters: values are written into the statement as literals, by psycopg's quoting or
as integers), so a transaction holds a server connection only while the server runs it.

Only for an engine made for PgBouncer (``db.create_engine`` of a ``pgbouncer=true`` URL: its BEGIN is the
execution option ``connections.PGBOUNCER_BEGIN``). An error invalidates the connection (the server's
transaction may be left open) and is raised as SQLAlchemy's, so that it is handled like any other; READ
WRITE refused (0A000: the node behind PgBouncer is a standby now) also drops the pool's connections, as
``connections.through_pgbouncer``'s ``on_error`` does, as an OperationalError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .connections import PGBOUNCER_BEGIN

REVISION = "SELECT revision FROM catalog_state WHERE id = 1"


async def in_one_trip(conn: AsyncConnection, *selects: str) -> list[list[tuple[Any, ...]]]:
    """The rows of each of ``selects``, run in one transaction sent as one simple query."""
    import psycopg

    begin = conn.engine.sync_engine.get_execution_options()[PGBOUNCER_BEGIN]
    statement = "; ".join([begin, *selects, "COMMIT"])
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    results: list[list[tuple[Any, ...]]] = []
    try:
        async with driver.cursor() as cursor:
            await cursor.execute(statement)
            while True:
                if cursor.description is not None:
                    results.append(await cursor.fetchall())
                if not cursor.nextset():
                    break
    except psycopg.Error as exc:
        await conn.invalidate()
        if getattr(exc, "sqlstate", None) == "0A000":
            await conn.engine.dispose()
            raise sa.exc.OperationalError(statement, None, exc, connection_invalidated=True) from exc
        raise sa.exc.DBAPIError.instance(
            statement, None, exc, psycopg.Error, connection_invalidated=True
        ) from exc
    return results


async def revision_in_one_trip(conn: AsyncConnection) -> int:
    """The catalog's revision: what a change poll asks every CE_POLL_INTERVAL."""
    (rows,) = await in_one_trip(conn, REVISION)
    if not rows:
        raise RuntimeError("catalog_state is empty: the database is not migrated")
    return int(rows[0][0])


async def changes_in_one_trip(
    conn: AsyncConnection, since: int, upto: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows of images and of deleted images with a revision in (``since``, ``upto``]."""
    window = f"revision > {int(since)} AND revision <= {int(upto)}"
    upserted, deleted = await in_one_trip(
        conn,
        f"SELECT body, revision FROM images WHERE {window}",
        f"SELECT id, revision FROM deleted_images WHERE {window}",
    )
    return upserted, deleted


async def select_in_one_trip(
    conn: AsyncConnection, query: str, values: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """The rows of one SELECT whose ``%s`` placeholders take ``values``, quoted by psycopg as literals."""
    from psycopg import sql

    driver = (await conn.get_raw_connection()).driver_connection
    literal = sql.SQL(query.replace("%s", "{}")).format(*(sql.Literal(v) for v in values))
    (rows,) = await in_one_trip(conn, literal.as_string(driver))
    return rows
