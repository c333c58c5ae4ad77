"""Is the database's schema the one this release needs? Asked by ``serve`` before it starts (it refuses an
unmigrated PostgreSQL with one line) and by ``/readyz`` before anything else."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa

from . import db

if TYPE_CHECKING:
    from .store import Store

UPGRADE_HINT = "run `cluster-engine db upgrade` (or start with `cluster-engine serve --migrate`)"


async def schema_problem(store: Store) -> str | None:
    """None when the schema is at this release's migration head; else what is wrong, in a few words
    ("the database has no schema", "the database schema is at 0002, this release needs 0003"). A database
    that cannot be reached raises (SQLAlchemy's OperationalError) as any query does."""
    try:
        revision = await store.schema_revision()
    except sa.exc.ProgrammingError:  # PostgreSQL: relation "alembic_version" does not exist
        revision = None
    except sa.exc.OperationalError as exc:  # SQLite: no such table (anything else: the database is down)
        if "no such table" not in str(exc):
            raise
        revision = None
    head = db.head_revision()
    if revision == head:
        return None
    if revision is None:
        return "the database has no schema"
    return f"the database schema is at {revision}, this release needs {head}"
