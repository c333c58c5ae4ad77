"""Waiting for database work with a deadline, without waiting for its cancellation.

``asyncio.wait_for`` cancels the work on timeout and then waits until the cancellation completes. A
query on a connection whose server is frozen or unreachable does not complete its cancellation
promptly: psycopg first sends a cancel request over a *new* connection (which also hangs) and then
waits for the query again, so a 1 s deadline became 11 s in the database-fault drill. ``within``
answers at the deadline and lets the work finish, or fail, in the background; the connection returns
to its pool when the database answers again or the connection breaks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_abandoned: set[asyncio.Future[object]] = set()  # strong references until they finish


def _finished(task: asyncio.Future[object]) -> None:
    _abandoned.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.info("work abandoned at its deadline failed later: %s", type(task.exception()).__name__)


async def within(work: Awaitable[T], seconds: float) -> T:
    """The result of ``work``, or ``TimeoutError`` after ``seconds`` (``work`` then goes on alone)."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:  # our caller went away: the work still must not be cut mid-query
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise TimeoutError(f"no answer within {seconds}s")
    return task.result()


def _abandon(task: asyncio.Future[T]) -> None:
    _abandoned.add(task)  # type: ignore[arg-type]
    task.add_done_callback(_finished)  # type: ignore[arg-type]
