"""Connections to PostgreSQL that stay usable: pinged after sitting idle, and through a transaction-pooling
PgBouncer (each transaction's BEGIN carries what a session would, a failover is found, a multi-host URL
connects to the host that takes writes). ``db.create_engine`` sets these up on the engines it makes.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

PING_AFTER_IDLE = 1.0  # seconds a pooled connection may sit unused and still be taken without a ping
PGBOUNCER_BEGIN = (
    "cluster_engine_pgbouncer_begin"  # an engine's execution option: its BEGIN through PgBouncer
)


def ping_when_idle(engine: AsyncEngine) -> None:
    """SQLAlchemy's ``pool_pre_ping``, only for connections that sat idle: a server restarted or a
    connection cut while in the pool is found (and the pool refilled) before a request uses it, as with
    pre-ping; but the poller, which takes a connection every CE_POLL_INTERVAL, pays no extra round trip
    on every poll (that was half of what a fleet's polling cost the primary). A connection that breaks
    while in use fails that statement, which SQLAlchemy sees as a disconnect: it drops the pool's
    connections, and the poller retries at its next turn."""
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect

    def note_use(_dbapi_connection: Any, record: Any) -> None:
        record.info["used_at"] = time.monotonic()

    def ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("used_at", 0.0) <= PING_AFTER_IDLE:
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa.exc.InvalidatePoolError(f"ping failed: {exc.__class__.__name__}") from exc
        if not alive:
            raise sa.exc.InvalidatePoolError("ping failed")

    event.listen(pool, "connect", note_use)
    event.listen(pool, "checkin", note_use)
    event.listen(pool, "checkout", ping_if_idle)


def through_pgbouncer(engine: AsyncEngine, timeout_ms: int, *, read_only: bool = False) -> None:
    """What changes through a transaction-pooling PgBouncer, where each transaction may run on another
    server connection and no session state follows the client:

    - No ``options`` startup parameter (PgBouncer refuses it: "unsupported startup parameter"; from 1.20
      it accepts only parameters the server reports, and statement_timeout is not one). Every transaction
      opens with ``BEGIN READ WRITE; SET LOCAL statement_timeout = …``, one simple query: the same single
      round trip as the ``BEGIN`` psycopg sends by itself, which it does not here (its connections are in
      autocommit mode; its commit() and rollback() act on the server's transaction status, so
      SQLAlchemy's transactions work as usual). A write still lifts the timeout for its COMMIT
      (``Store._bump``).
    - No prepared statements (``prepare_threshold=None``): one prepared on a server connection does not
      exist on the next, and two clients' ``_pg3_0`` collide on a shared one (PgBouncer >= 1.21 can track
      them with ``max_prepared_statements``; Debian 12 has 1.18).
    - PgBouncer announces the server parameters its pool saw first (``in_hot_standby``,
      ``default_transaction_read_only``) until the pool is rebuilt, so after a failover libpq's
      ``target_session_attrs=read-write`` can take a demoted node's PgBouncer for the primary and refuse
      the promoted one. So a multi-host URL's hosts are tried here, each asked with a query; and
      ``READ WRITE`` fails the first transaction on a node that became a standby (reads included: a
      standby cannot confirm the catalog is current), which drops the pool's connections as a
      disconnect does. See deploy/ha/. A standby's engine (``read_only``) begins READ ONLY instead and
      takes any host.
    """
    begin = f"BEGIN READ {'ONLY' if read_only else 'WRITE'}; SET LOCAL statement_timeout = {timeout_ms}"
    engine.sync_engine.update_execution_options(**{PGBOUNCER_BEGIN: begin})

    def on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(begin)

    def on_error(context: sa.engine.ExceptionContext) -> sa.exc.OperationalError | None:
        """0A000 from our BEGIN ("cannot set transaction read-write mode during recovery"): the node
        behind the pooler is a standby now. Drop the pool's connections (the next ones find the primary)
        and raise an OperationalError (the database is unavailable: a 503 with Retry-After, as during any
        failover), not a bug."""
        original = context.original_exception
        if context.statement != begin or getattr(original, "sqlstate", None) != "0A000":
            return None
        context.is_disconnect = True
        return sa.exc.OperationalError(
            context.statement, context.parameters, original, connection_invalidated=True
        )

    event.listen(engine.sync_engine, "begin", on_begin)
    if not read_only:
        event.listen(engine.sync_engine, "handle_error", on_error)
        event.listen(engine.sync_engine, "do_connect", _connect_to_a_writable_host)


def _connect_to_a_writable_host(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    """For a multi-host URL with ``target_session_attrs`` read-write or primary, through a pooler: try
    each host in order (as libpq would) and keep the first whose server says, when asked with a query,
    that it takes writes. None (other URLs): libpq's own connect."""
    attrs = cparams.get("target_session_attrs")
    hosts = str(cparams.get("host") or "").split(",")
    if attrs not in ("read-write", "primary") or len(hosts) < 2 or "hostaddr" in cparams:
        return None
    ports = str(cparams.get("port") or "").split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    query = "SHOW transaction_read_only" if attrs == "read-write" else "SELECT pg_is_in_recovery()"
    dbapi = dialect.loaded_dbapi
    refused: list[str] = []
    for host, port in zip(hosts, ports, strict=False):
        params = {**cparams, "host": host, "target_session_attrs": "any"}
        params.pop("port", None)
        if port:
            params["port"] = port
        try:
            connection = dialect.connect(*cargs, **params)
        except dbapi.Error as exc:
            refused.append(f"{host}:{port or 5432}: {exc}")
            continue
        try:
            cursor = connection.cursor()
            cursor.execute(query)
            (answer,) = cursor.fetchone()
            cursor.close()
        except dbapi.Error as exc:
            connection.close()
            refused.append(f"{host}:{port or 5432}: {exc}")
            continue
        if answer in ("off", False):
            return connection
        connection.close()
        refused.append(f"{host}:{port or 5432}: {'read-only' if attrs == 'read-write' else 'in recovery'}")
    raise dbapi.OperationalError(f"no host takes writes ({attrs}): " + "; ".join(refused))
