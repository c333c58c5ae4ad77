"""The CLI's exit codes: one table (code, name, meaning). The CLI's failures take their codes from it
(``Failure``, and ``images.SDK_EXITS`` for the SDK's errors), and the ``--help`` text and README's
sentence for scripts are made from it, so the three cannot drift apart.

click's own exceptions keep their codes, which are the table's: ``ClickException`` (and ``Abort``) 1,
``UsageError`` 2 (tests/test_cli_client.py holds them to it). ``Failure`` is not a ``ClickException``:
click declares that one's code per class, and a failure's code is its row's.
"""

from __future__ import annotations

import dataclasses

import click


@dataclasses.dataclass(frozen=True)
class ExitCode:
    code: int
    name: str  # a word for scripts and the help's second column
    meaning: str


OK = ExitCode(0, "ok", "success")
ERROR = ExitCode(1, "error", "other error")
USAGE = ExitCode(2, "usage", "usage error")
INVALID = ExitCode(3, "invalid", "invalid request (HTTP 400) or catalog entries")
AUTH = ExitCode(4, "auth", "not authenticated or not allowed (HTTP 401, 403)")
NOT_FOUND = ExitCode(5, "not-found", "not found (HTTP 404)")
CONFLICT = ExitCode(6, "conflict", "conflict (HTTP 409)")
UNAVAILABLE = ExitCode(7, "unavailable", "unavailable (HTTP 503, connection failure, timeout)")
EXIT_CODES = (OK, ERROR, USAGE, INVALID, AUTH, NOT_FOUND, CONFLICT, UNAVAILABLE)


def help_text() -> str:
    """The table for a ``--help`` page (``\\b``: click keeps the lines as they are)."""
    width = max(len(exit.name) for exit in EXIT_CODES) + 2
    rows = (f"  {exit.code}  {exit.name:<{width}}{exit.meaning}" for exit in EXIT_CODES)
    return "\b\nExit codes:\n" + "\n".join(rows)


def sentence() -> str:
    """The table as README's one sentence for scripts."""
    return "Exit codes, for scripts: " + ", ".join(f"{exit.code} {exit.meaning}" for exit in EXIT_CODES) + "."


class Failure(Exception):
    """A command that ends unsuccessfully: its lines for stderr (``error: …``, then one line per problem)
    and its row of the table. The ``cluster-engine`` group (main.py) shows it and exits with its code."""

    def __init__(self, exit: ExitCode, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.exit = exit
        self.lines = lines

    def show(self) -> None:
        for line in self.lines:
            click.echo(line, err=True)
