"""The ``cluster-engine`` command group and what its commands share: the settings read from the environment,
logging, a store opened for one command, the demo catalog. The commands are in ``server`` (serve, token),
``database`` (db, catalog, audit) and ``images`` (the SDK-backed images commands)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import yaml

from ..server.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from ..storage.store import Store

# The server stack (SQLAlchemy, JWT, the store) is imported inside the commands that use it, so that
# client commands such as `cluster-engine images list` start quickly.

log = logging.getLogger("cluster_engine")

DEMO_ORG = uuid.UUID("0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01")


T = TypeVar("T")


def _with_store(
    settings: Settings, work: Callable[[Store], Awaitable[T]], *, statement_timeout: float | None = 5.0
) -> T:
    """Run ``work`` against a store opened for this one command, and close it."""
    from ..storage.store import Store

    async def run() -> T:
        store = Store.open(settings.database_url, statement_timeout=statement_timeout)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _settings() -> Settings:
    try:
        return load_settings(os.environ)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return sys.argv[0] if name == "cluster-engine" else f"{Path(sys.executable).name} -m cluster_engine"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(metadata.version("cluster-engine"), prog_name="cluster-engine")
def main() -> None:
    """cluster-engine: the Cluster Engine Images API, self-hosted."""


async def _load_demo(store: Store) -> str:
    from ..server.catalog_entries import read_catalog_entries

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
from .images import images as _images_group  # noqa: E402

main.add_command(_images_group)
