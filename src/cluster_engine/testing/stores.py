"""A ``Store`` opened for one piece of work and closed after it, for tests, drills and bench scripts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from ..storage.store import Store
from . import run_sync

T = TypeVar("T")


@contextlib.asynccontextmanager
async def opened_store(url: str, *, statement_timeout: float | None = 5.0) -> AsyncIterator[Store]:
    """``async with opened_store(url) as store:`` the store on ``url``, closed (its pool disposed) after."""
    store = Store.open(url, statement_timeout=statement_timeout)
    try:
        yield store
    finally:
        await store.close()


def in_store(url: str, work: Callable[[Store], Awaitable[T]], *, statement_timeout: float | None = 5.0) -> T:
    """Run ``work(store)`` on a store opened on ``url`` for it, on an event loop of its own (``run_sync``:
    from plain code and from inside a running loop alike); return its result."""

    async def run() -> T:
        async with opened_store(url, statement_timeout=statement_timeout) as store:
            return await work(store)

    return run_sync(run)
