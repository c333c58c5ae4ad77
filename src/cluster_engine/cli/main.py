"""The ``cluster-engine`` command group and what its commands share: the settings read from the environment,
logging, a store opened for one command, the demo catalog. The commands are in ``server`` (serve, token),
``database`` (db, catalog, audit) and ``images`` (the SDK-backed images commands)."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import yaml

from ..extras import server_hint
from ..server import logformat
from ..server.config import ConfigError, Settings, load_settings
from . import exits

if TYPE_CHECKING:
    from ..storage.store import Store

# The server stack (SQLAlchemy, JWT, the store) is imported inside the commands that use it, so that
# client commands such as `cluster-engine images list` start quickly.

log = logging.getLogger("cluster_engine")

DEMO_ORG = uuid.UUID("0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01")


T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def needs_server(command: F) -> F:
    """A command of the server extra: without it, one line naming ``pip install 'cluster-engine[server]'``
    and exit status 1, instead of an ImportError's traceback."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        names: list[str] = []
        ctx = click.get_current_context()
        while ctx.parent is not None:
            names.insert(0, ctx.info_name or "")
            ctx = ctx.parent
        hint = server_hint(f"`cluster-engine {' '.join(names)}`")
        if hint is not None:
            raise click.ClickException(hint)
        return command(*args, **kwargs)

    return checked  # type: ignore[return-value]


def _with_store(
    settings: Settings, work: Callable[[Store], Awaitable[T]], *, statement_timeout: float | None = 5.0
) -> T:
    """Run ``work`` against a store opened for this one command, and close it."""
    import asyncio

    from ..storage.store import opened

    async def run() -> T:
        async with opened(settings.database_url, statement_timeout=statement_timeout) as store:
            return await work(store)

    return asyncio.run(run())


def _settings() -> Settings:
    try:
        return load_settings(os.environ)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return sys.argv[0] if name == "cluster-engine" else f"{Path(sys.executable).name} -m cluster_engine"


def _configure_logging(level: str, settings: Settings) -> logformat.Format:
    """The app's and Granian's logging in CE_LOG_FORMAT (logformat.py); returns the format."""
    fmt = logformat.resolve(settings.log_format)
    logformat.configure(level, fmt)
    return fmt


_LAZY_COMMANDS = {"images": "cluster_engine.cli.images"}  # command name -> module defining it


class _Main(click.Group):
    """The top-level group; ``images`` (the client CLI, which imports httpx) is imported only when used,
    so that ``--version`` and the server commands do not pay for it. A command's ``exits.Failure`` ends
    here: its lines on stderr, its code as the exit status."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except exits.Failure as failure:
            failure.show()
            ctx.exit(failure.exit.code)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            import importlib

            command: click.Command = getattr(importlib.import_module(_LAZY_COMMANDS[cmd_name]), cmd_name)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]}, epilog=exits.help_text())
@click.version_option(package_name="cluster-engine", prog_name="cluster-engine")
def main() -> None:
    """cluster-engine: the Cluster Engine Images API, self-hosted."""


async def _load_demo(store: Store) -> str:
    from ..rules.catalog_entries import read_catalog_entries

    if await store.count():
        return "not loaded (the catalog already has images)"
    report = await store.import_catalog(read_catalog_entries(demo_catalog()))
    return f"{len(report.created)} images loaded"


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def demo_catalog() -> Any:
    text = (resources.files("cluster_engine") / "demo" / "catalog.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


from . import database, server  # noqa: E402, F401  (their commands register themselves on main)
