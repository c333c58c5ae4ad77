"""A ``Store`` opened for one piece of work and closed after it, for tests, drills and bench scripts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..storage.store import Store, opened
from . import run_sync

T = TypeVar("T")


opened_store = opened  # ``async with opened_store(url) as store:``: storage.store.opened, named for tests


def in_store(url: str, work: Callable[[Store], Awaitable[T]], *, statement_timeout: float | None = 5.0) -> T:
    """Run ``work(store)`` on a store opened on ``url`` for it, on an event loop of its own (``run_sync``:
    from plain code and from inside a running loop alike); return its result."""

    async def run() -> T:
        async with opened_store(url, statement_timeout=statement_timeout) as store:
            return await work(store)

    return run_sync(run)
