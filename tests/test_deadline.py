"""deadline.within: answers at the deadline, and neither cancels the work nor waits for it."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster_engine.deadline import within


async def _stubborn(finished: list[str], seconds: float) -> str:
    """Like a query on a frozen server: slow, and slow again to be cancelled."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await asyncio.sleep(seconds)  # psycopg's cancel request also hangs
        raise
    finished.append("done")
    return "result"


def test_within_returns_the_result_in_time() -> None:
    finished: list[str] = []
    assert asyncio.run(within(_stubborn(finished, 0.01), 5.0)) == "result"
    assert finished == ["done"]


def test_within_answers_at_the_deadline_and_lets_the_work_finish() -> None:
    finished: list[str] = []

    async def scenario() -> float:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await within(_stubborn(finished, 0.5), 0.05)
        elapsed = time.monotonic() - began
        assert finished == []
        await asyncio.sleep(0.7)  # the work was not cancelled: it completes on its own
        assert finished == ["done"]
        return elapsed

    assert asyncio.run(scenario()) < 0.4


def test_a_failure_after_the_deadline_is_retrieved_not_reported_as_lost() -> None:
    async def failing() -> None:
        await asyncio.sleep(0.1)
        raise ConnectionError("the database went away")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        unretrieved: list[object] = []
        loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
        with pytest.raises(TimeoutError):
            await within(failing(), 0.01)
        await asyncio.sleep(0.3)
        import gc

        gc.collect()
        assert unretrieved == []

    asyncio.run(scenario())


def test_the_callers_cancellation_does_not_cancel_the_work() -> None:
    finished: list[str] = []

    async def scenario() -> None:
        waiter = asyncio.create_task(within(_stubborn(finished, 0.2), 5.0))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.3)
        assert finished == ["done"]

    asyncio.run(scenario())
