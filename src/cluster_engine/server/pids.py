"""Processes by id: whether one is alive, and which processes descend from one (Linux /proc).

Used to clean up after processes that were killed, and by the tests, drills and benchmark to find a
server's workers or a PostgreSQL server's backends.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (empty when it is gone, or without /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                found += [
                    int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                ]
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, and so on."""
    found: list[int] = []
    stack = [pid]
    while stack:
        below = children(stack.pop())
        found += below
        stack += below
    return found
