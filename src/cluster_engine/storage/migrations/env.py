"""Alembic environment: runs migrations through the service's own async engine (both dialects)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from cluster_engine.storage.db import create_engine, metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_engine(config.attributes["database_url"])
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `cluster-engine db upgrade`")
asyncio.run(_run_online())
