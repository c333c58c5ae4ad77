"""The database commands: ``db upgrade``/``downgrade``, ``catalog import``/``export`` and ``audit``."""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import exits
from .main import _redact, _settings, _with_store, main, needs_server

# The server stack (SQLAlchemy, JWT, the store) is imported inside the commands that use it, so that
# client commands such as `cluster-engine images list` start quickly.


F = TypeVar("F", bound=Callable[..., Any])


def _output_option(formats: list[str], help_text: str) -> Callable[[F], F]:
    """``-o/--output``: one of ``formats``, the first by default."""
    return click.option(
        "-o", "--output", type=click.Choice(formats), default=formats[0], show_default=True, help=help_text
    )


@main.group(name="db")
def db_group() -> None:
    """Database schema migrations."""


@db_group.command()
@click.option("--revision", default="head", show_default=True)
@needs_server
def upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    _migrate("upgrade", revision)


@db_group.command()
@click.argument("revision")
@needs_server
def downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (``base`` removes every table)."""
    _migrate("downgrade", revision)


def _migrate(direction: str, revision: str) -> None:
    """``db.upgrade`` or ``db.downgrade`` of the configured database to ``revision``, and say so."""
    from ..storage import db

    settings = _settings()
    step = db.upgrade if direction == "upgrade" else db.downgrade
    step(settings.database_url, revision)
    click.echo(f"database at {revision}: {_redact(settings.database_url)}")


@main.group()
def catalog() -> None:
    """Catalog files: import and export the images an operator publishes."""


@catalog.command(name="import")
@click.argument("file", type=click.File("rb"))
@click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--prune", is_flag=True, help="Also delete Public images that are not in FILE.")
@_output_option(["text", "json"], "Report format.")
@needs_server
def import_(file: Any, dry_run: bool, prune: bool, output: str) -> None:
    """Create or update the images in FILE (YAML or JSON list) in one transaction; idempotent."""
    from ..invalid import Invalid
    from ..server.errors import ApiError
    from ..storage import catalog_files, db
    from ..storage.errors import StoreError

    settings = _settings()
    try:
        source = catalog_files.CatalogSource(file, file.name)  # a YAML file is read (and checked) whole here
    except catalog_files.CatalogFileError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.database_url.startswith("sqlite"):
        db.upgrade(settings.database_url)
    progress = catalog_files.Progress()
    try:
        report = _with_store(
            settings,
            lambda store: catalog_files.import_source(
                store, source, dry_run=dry_run, prune=prune, progress=progress
            ),
            statement_timeout=None,
        )
    except catalog_files.CatalogFileError as exc:
        raise click.ClickException(str(exc)) from None
    except Invalid as exc:
        lines = [
            f"{file.name}: {item.field}: {item.reason} (got {item.originalValue!r})" for item in exc.details
        ]
        omitted = getattr(exc, "omitted", 0)
        if omitted:
            lines.append(f"{file.name}: … and {omitted:,} more problems")
        raise exits.Failure(exits.INVALID, *lines) from None
    except (ApiError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    summary = report.summary()
    if not prune:
        del summary["deleted"]
    if output == "json":
        click.echo(json.dumps({**summary, "dryRun": dry_run, "revision": report.revision}))
    else:
        prefix = "would be " if dry_run else ""
        click.echo(", ".join(f"{prefix}{key} {value}" for key, value in summary.items()))


@catalog.command(name="export")
@_output_option(["yaml", "json"], "File format written to stdout.")
@click.option(
    "--type",
    "image_type",
    type=click.Choice(["Public", "Customized", "all"]),
    default="all",
    show_default=True,
    help="Which images to export.",
)
@needs_server
def export(output: str, image_type: str) -> None:
    """Write the catalog as a catalog file (ids and createdAt kept, so it re-imports to the same state)."""
    from ..schemas import ImageType
    from ..storage import catalog_files

    settings = _settings()
    sys.stdout.flush()
    out = sys.stdout.buffer
    wanted = None if image_type == "all" else ImageType(image_type)
    fmt: Any = output
    _with_store(
        settings,
        lambda store: catalog_files.export_catalog(
            store, out, output=fmt, image_type=wanted, progress=catalog_files.Progress()
        ),
        statement_timeout=None,
    )
    out.flush()


@main.command()
@click.option(
    "--since",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]),
    default=None,
    help="Only changes at or after this time (UTC unless an offset is given).",
)
@click.option("--image", "image_id", type=click.UUID, default=None, help="Only changes to this image.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1_000_000),
    default=1000,
    show_default=True,
    help="The most recent changes to show at most.",
)
@_output_option(["table", "json"], "A line per change, or JSON.")
@needs_server
def audit(since: dt.datetime | None, image_id: uuid.UUID | None, limit: int, output: str) -> None:
    """Show the audit trail: every create, update and delete, by whom, of which image, what changed."""
    settings = _settings()
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    rows = _with_store(
        settings, lambda store: store.audit_entries(since=since, image_id=image_id, limit=limit)
    )
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        who = row["actor"] or "-"
        org = row["actorOrg"] or "operator"
        fields = ",".join(sorted(row["changes"])) if row["action"] == "update" else ""
        click.echo(
            f"{row['at']}  r{row['revision']:<6} {row['action']:<7} {row['imageId']}  {org} {who}"
            + (f"  {fields}" if fields else "")
        )
