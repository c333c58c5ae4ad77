"""Table definitions, engine creation per dialect, and schema migrations (Alembic). How connections are
checked, and how they go through PgBouncer and to a writable host, is in connections.py.

The tables here are the source of truth that the migrations must reproduce; a test compares them on
every backend.
"""

from __future__ import annotations

import functools
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .connections import PING_AFTER_IDLE as PING_AFTER_IDLE
from .connections import ping_when_idle, through_pgbouncer

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
    through PgBouncer (``pgbouncer=true``): see ``connections.through_pgbouncer``. ``read_only``: the
    engine of a standby (CE_DATABASE_READ_URL), whose transactions through PgBouncer begin READ ONLY."""
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
    ping_when_idle(engine)
    if pooled:
        through_pgbouncer(engine, timeout_ms, read_only=read_only)
    return engine


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
