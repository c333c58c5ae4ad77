"""Table definitions, engine creation per dialect, and schema migrations (Alembic).

The tables here are the source of truth that the migrations must reproduce; a test compares them on
every backend.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

metadata = sa.MetaData()

catalog_state = sa.Table(
    "catalog_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    # Bumped by every write in the same transaction; workers compare it to their read model's.
    sa.Column("revision", sa.BigInteger, nullable=False),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("org_id", sa.Uuid, nullable=False),
    # Names are unique per (namespace, idc): "public" for Public images, the owner org id for Customized.
    sa.Column("namespace", sa.String(36), nullable=False),
    sa.Column("idc", sa.String(50), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("os_series", sa.Text, nullable=False),
    sa.Column("os_version", sa.Text, nullable=False),
    sa.Column("os_architecture", sa.Text, nullable=False),
    sa.Column("boot_mode", sa.String(16), nullable=False),
    sa.Column("system_disk_size", sa.Text, nullable=False),
    sa.Column("icon", sa.Text, nullable=False),
    sa.Column("default_partition_table", sa.JSON, nullable=False),
    sa.Column("supported_products", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    # The image as served (its ImageResp JSON), written with every change of the row: loading an org is
    # one indexed read of these bytes, with no decoding of columns and no re-encoding.
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("namespace", "idc", "name", name="uq_images_namespace_idc_name"),
    sa.Index("ix_images_revision", "revision"),
    sa.Index("ix_images_idc", "idc"),
    sa.Index("ix_images_org_id", "org_id"),
)

# Ids of deleted images with the revision that deleted them, so workers can apply changes incrementally.
deleted_images = sa.Table(
    "deleted_images",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Index("ix_deleted_images_revision", "revision"),
)


# One row per change, written in the same transaction as the change itself.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column(
        "seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # create | update | delete
    sa.Column("image_id", sa.Uuid, nullable=False),
    sa.Column("actor_org", sa.Uuid, nullable=True),  # None: an operator's CLI (catalog import)
    sa.Column("actor", sa.Text, nullable=True),  # token subject, or "cli:catalog-import"
    sa.Column("changes", sa.JSON, nullable=False),
    sa.Index("ix_audit_log_image_id", "image_id"),
    sa.Index("ix_audit_log_at", "at"),
)


def multi_host_url(url: str) -> str:
    """libpq's multi-host form ``postgresql://user@h1:p1,h2:p2/db?…`` (what operators write for a failover
    pair) in the form SQLAlchemy parses: ``postgresql://user@/db?host=h1:p1&host=h2:p2&…``. Other URLs
    are returned unchanged."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres") or "," not in parts.netloc:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    query = [("host", host) for host in hosts.split(",") if host]
    query += parse_qsl(parts.query, keep_blank_values=True)
    netloc = f"{userinfo}@" if userinfo else ""
    return f"{parts.scheme}://{netloc}{parts.path}?{urlencode(query, safe=':[]')}"


# The service's own query parameter of a PostgreSQL URL (never passed on to libpq): the URL points at a
# PgBouncer in transaction-pooling mode (or another pooler that hands each transaction to any server
# connection). See ``create_engine`` and README.md's PostgreSQL section.
PGBOUNCER_PARAM = "pgbouncer"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def uses_pgbouncer(url: str) -> bool:
    """Whether a database URL carries ``pgbouncer=true`` (a transaction-pooling PgBouncer)."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        return False
    values = [
        v.strip().lower() for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == PGBOUNCER_PARAM
    ]
    for value in values:
        if value not in _TRUE + _FALSE:
            raise ValueError(f"{PGBOUNCER_PARAM}= in the database URL must be true or false, got {value!r}")
    return bool(values) and values[-1] in _TRUE


def async_url(url: str) -> str:
    """Map the user-facing URL (sqlite:///…, postgresql://…) onto the async driver we ship (without the
    service's own ``pgbouncer`` parameter, which libpq would refuse)."""
    parsed = make_url(multi_host_url(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        parsed = parsed.difference_update_query([PGBOUNCER_PARAM])
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database URL scheme: {parsed.drivername}")


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(multi_host_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_engine(
    url: str,
    *,
    statement_timeout: float | None = 5.0,
    pool_size: int = 5,
    max_overflow: int = 5,
    read_only: bool = False,
) -> AsyncEngine:
    """An async engine with a bounded pool and timeouts, so a dead database fails fast instead of hanging.
    On PostgreSQL the pool holds ``pool_size`` connections at rest and at most ``pool_size + max_overflow``
    (a serving worker's budget, see CE_DB_POOL_SIZE); SQLite's pool is SQLAlchemy's own.
    ``statement_timeout`` (seconds; None or 0: none) is a startup parameter of every connection, except
    through PgBouncer (``pgbouncer=true``): see ``_through_pgbouncer``. ``read_only``: the engine of a
    standby (CE_DATABASE_READ_URL), whose transactions through PgBouncer begin READ ONLY."""
    driver_url = async_url(url)
    if driver_url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(driver_url, connect_args={"timeout": 5})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    timeout_ms = int((statement_timeout or 0) * 1000)
    pooled = uses_pgbouncer(url)
    session: dict[str, Any] = (
        {"prepare_threshold": None, "autocommit": True}
        if pooled
        else {"options": f"-c statement_timeout={timeout_ms}"}
    )
    engine = create_async_engine(
        driver_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=2,
        connect_args={
            "connect_timeout": 2,
            **session,
            # a peer that vanished (host down, network partition) is noticed in seconds, not after TCP's
            # default ~15 minutes of retransmissions
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
        },
    )
    _ping_when_idle(engine)
    if pooled:
        _through_pgbouncer(engine, timeout_ms, read_only=read_only)
    return engine


PING_AFTER_IDLE = 1.0  # seconds a pooled connection may sit unused and still be taken without a ping


PGBOUNCER_BEGIN = "cluster_engine_pgbouncer_begin"  # an engine's execution option: its BEGIN via PgBouncer


def _ping_when_idle(engine: AsyncEngine) -> None:
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


def _through_pgbouncer(engine: AsyncEngine, timeout_ms: int, *, read_only: bool = False) -> None:
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


# ------------------------------------------------------------------------------------------- migrations


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("cluster_engine.storage") / "migrations"))
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> list[str]:
    """Apply migrations up to ``revision``; return the steps run ("0002 -> 0003"), logged as one INFO
    line of the ``cluster_engine.storage.db`` logger (nothing when there was nothing to do). Alembic's own
    lines (a "setup plugin" line per plugin, "Context impl", one per step) are not passed on."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    quiet = [logging.getLogger(name) for name in ("alembic", "alembic.runtime.migration")]
    saved = [(logger.level, logger.propagate) for logger in quiet]
    migration = quiet[1]
    quiet[0].setLevel(logging.WARNING)
    migration.setLevel(logging.INFO)
    migration.propagate = False
    migration.addHandler(steps)
    try:
        from alembic import command  # its first import logs a "setup plugin" line per plugin

        command.upgrade(alembic_config(url), revision)
    finally:
        migration.removeHandler(steps)
        for logger, (level, propagate) in zip(quiet, saved, strict=True):
            logger.setLevel(level)
            logger.propagate = propagate
    if steps.ran:
        logging.getLogger(__name__).info(
            "database migrated: %s (%d migration%s)",
            ", ".join(steps.ran),
            len(steps.ran),
            "" if len(steps.ran) == 1 else "s",
        )
    return steps.ran


class _Steps(logging.Handler):
    """Collects Alembic's "Running upgrade A -> B, …" records; other records of it at WARNING or above
    are passed on to the ``cluster_engine.storage.db`` logger."""

    _STEP = re.compile(r"Running upgrade (\S*) -> (\S+?),")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.ran: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self._STEP.match(record.getMessage())
        if match:
            self.ran.append(f"{match.group(1) or 'empty'} -> {match.group(2)}")
        elif record.levelno >= logging.WARNING:
            logging.getLogger(__name__).handle(record)


@functools.cache
def head_revision() -> str:
    """The migration this release's code expects (Alembic's head)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
