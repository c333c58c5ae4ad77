"""The ``cluster-engine`` command: serve, token, db, catalog. The only module that reads the environment."""

from __future__ import annotations

import datetime as dt
import errno
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
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


def _configure_logging(level: str, settings: Settings) -> logformat.Format:
    """The app's and Granian's logging in CE_LOG_FORMAT (logformat.py); returns the format."""
    fmt = logformat.resolve(settings.log_format)
    logformat.configure(level, fmt)
    return fmt


def worker_app() -> Any:
    """Granian's factory target: each worker process builds its app from the same environment."""
    from ..server.app import create_app
    from ..server.connguard import ConnectionGuard

    settings = load_settings(os.environ)
    _configure_logging(os.environ.get("CE_LOG_LEVEL", "info"), settings)
    ConnectionGuard.start(settings.max_connections)  # idle ones closed first, then 503s, at the budget
    return create_app(settings)


_LAZY_COMMANDS = {"images": "cluster_engine.cli.images"}  # command name -> module defining it


class _Main(click.Group):
    """The top-level group; ``images`` (the client CLI, which imports httpx) is imported only when used,
    so that ``--version`` and the server commands do not pay for it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            import importlib

            command: click.Command = getattr(importlib.import_module(_LAZY_COMMANDS[cmd_name]), cmd_name)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cluster-engine", prog_name="cluster-engine")
def main() -> None:
    """cluster-engine: the Cluster Engine Images API, self-hosted."""


# ----------------------------------------------------------------------------------------------- serve


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on."
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Worker processes.")
@click.option("--demo", is_flag=True, help="Load the bundled demo catalog when the catalog is empty.")
@click.option(
    "--migrate/--no-migrate",
    default=None,
    help="Apply database migrations before serving (default: only for SQLite).",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@needs_server
def serve(host: str, port: int, workers: int, demo: bool, migrate: bool | None, log_level: str) -> None:
    """Run the API server."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    from ..server.auth import Verifier, signing_secret
    from ..storage import db

    settings = _settings()
    log_format = _configure_logging(log_level, settings)
    _refuse_busy_port(host, port)
    secret = signing_secret(settings, create=True)
    if secret is not None and not settings.jwt_secret and _all_interfaces(host):
        log.warning(
            "serving %s on every interface with a generated development secret (%s): anyone who reads it "
            "mints tokens; set CE_JWT_SECRET (or a public key / JWKS) for anything but a trial",
            host,
            settings.dev_secret_path,
        )
    is_sqlite = settings.database_url.startswith("sqlite")
    if migrate or (migrate is None and is_sqlite):
        db.upgrade(settings.database_url)
    else:
        _refuse_unmigrated(settings)
    try:
        Verifier(settings)  # fail now, not in every worker, when the key configuration is unusable
    except (ConfigError, OSError, ValueError) as exc:
        raise click.ClickException(f"JWT key configuration: {exc}") from None
    loaded = _with_store(settings, _load_demo) if demo else None
    # Workers rebuild Settings from the environment; pin what defaults resolved to here.
    os.environ["CE_DATA_DIR"] = str(settings.data_dir)
    os.environ["CE_DATABASE_URL"] = settings.database_url
    os.environ["CE_LOG_LEVEL"] = log_level
    # Workers share metrics through files in one fresh directory (prometheus_client's multiprocess mode).
    _remove_stale_metrics_dirs()
    metrics_dir = tempfile.TemporaryDirectory(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}"
    lines = [
        f"cluster-engine serving {url} ({workers} worker{'s' if workers > 1 else ''})",
        f"  database: {_redact(settings.database_url)}",
    ]
    if loaded is not None:
        lines.append(f"  demo catalog: {loaded}")
    if secret is not None and not settings.jwt_secret:
        lines.append(f"  auth: development secret in {settings.dev_secret_path}")
    if secret is not None:
        org = DEMO_ORG if demo else uuid.UUID(int=0)
        lines += [
            f"  TOKEN=$({_program()} token --org {org})",
            f'  curl -H "Authorization: Bearer $TOKEN" {url}/v1/images',
        ]
    else:
        lines.append("  auth: tokens from your identity provider (public key / JWKS configured)")
    if log_format == "json":  # a log collector gets the banner as log lines like every other
        for line in lines:
            log.info("%s", line.strip())
    else:
        click.echo("\n".join(lines), err=False)
        sys.stdout.flush()
    with metrics_dir:
        Granian(
            "cluster_engine.cli.main:worker_app",
            factory=True,
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop if _has_uvloop() else Loops.asyncio,
            workers=workers,
            respawn_failed_workers=True,  # a worker that dies (OOM kill, crash) is replaced
            log_level=LogLevels(log_level),
            log_dictconfig=logformat.logging_config(log_level, log_format),
            log_access=False,
            # HTTP/1 only: in "auto" mode Granian reads the first bytes to pick the protocol before hyper's
            # header timer starts, so a connection that sends nothing was held forever (issue #14); with
            # http1, hyper's header_read_timeout runs from accept and again whenever a keep-alive
            # connection goes idle.
            http=HTTPModes.http1,
            backlog=settings.backlog,
            backpressure=settings.max_connections,  # connections a worker holds at most (per worker)
            http1_settings=HTTP1Settings(
                header_read_timeout=int(settings.header_timeout * 1000),
                max_buffer_size=settings.max_header_bytes,
            ),
        ).serve()


def _all_interfaces(host: str) -> bool:
    return host in ("0.0.0.0", "::", "[::]", "")


def _refuse_unmigrated(settings: Settings) -> None:
    """Exit with one line when the database answers and its schema is not this release's (workers would
    serve 503s forever); a database that does not answer yet is waited for by the workers, as before."""
    from sqlalchemy.exc import DBAPIError

    from ..storage.schema_check import UPGRADE_HINT, schema_problem

    try:
        problem = _with_store(settings, schema_problem)
    except DBAPIError as exc:
        log.warning("database not reachable yet (%s): serving 503s until it is", exc.__class__.__name__)
        return
    if problem is not None:
        raise click.ClickException(f"{problem} ({_redact(settings.database_url)}): {UPGRADE_HINT}")


def _refuse_busy_port(host: str, port: int) -> None:
    """Exit with one line when HOST:PORT is already listened on. Granian binds with SO_REUSEPORT, so a
    second server on a busy port would start silently and share the port (answering from another database);
    a probe bound without SO_REUSEPORT fails on any listening socket, whatever the other side set."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as exc:
            shown = f"[{host}]" if ":" in host else host
            busy = exc.errno == errno.EADDRINUSE
            reason = "is already in use" if busy else f"cannot be bound ({exc.strerror})"
            message = f"port {port} on {shown} {reason}; choose another with --port"
            raise click.ClickException(message) from None


METRICS_DIR_PREFIX = "cluster-engine-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of servers that were killed before they could clean up (named
    after the server's pid; one whose pid is alive, ours or not, is left alone)."""
    # not from .observability: importing prometheus_client before PROMETHEUS_MULTIPROC_DIR is set would
    # put the workers (forked from this process) in single-process mode
    from ..server.pids import pid_alive

    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name[len(METRICS_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


async def _load_demo(store: Store) -> str:
    from ..server.validation import read_catalog_entries

    if await store.count():
        return "not loaded (the catalog already has images)"
    report = await store.import_catalog(read_catalog_entries(demo_catalog()))
    return f"{len(report.created)} images loaded"


def demo_catalog() -> Any:
    text = (resources.files("cluster_engine") / "demo" / "catalog.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# ----------------------------------------------------------------------------------------------- token

_DURATION = re.compile(r"(-?)(\d+)([smhd]?)")


def _duration(value: str) -> int:
    """Seconds in "3600", "90m", "12h", "7d"; negative ("-1h") for a token that expired that long ago."""
    match = _DURATION.fullmatch(value.strip())
    if not match or int(match.group(2)) == 0:
        raise click.BadParameter("a non-zero duration such as 3600, 90m, 12h or 7d (negative: expired)")
    seconds = int(match.group(2)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(3)]
    return -seconds if match.group(1) else seconds


@main.command()
@click.option("--org", "org", required=True, type=click.UUID, help="The caller's org (the orgId claim).")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    help="Scope to grant, repeatable or space-separated (images:write, images:admin).",
)
@click.option(
    "--ttl",
    default="1h",
    show_default=True,
    help="Lifetime: seconds, or with s/m/h/d; negative (--ttl=-1h) for a token that expired that long ago.",
)
@click.option(
    "--expired",
    is_flag=True,
    help="A correctly signed token that has already expired (past CE_JWT_LEEWAY): for testing clients.",
)
@click.option("--subject", default=None, help="The sub claim (who the token stands for).")
@click.option(
    "--create-secret",
    is_flag=True,
    help="Create the development secret when there is none (as `serve` does on first start).",
)
@needs_server
def token(
    org: uuid.UUID,
    scopes: tuple[str, ...],
    ttl: str,
    expired: bool,
    subject: str | None,
    create_secret: bool,
) -> None:
    """Mint a bearer token signed with CE_JWT_SECRET (or the generated development secret)."""
    from ..server.auth import mint_token, signing_secret

    settings = _settings()
    lifetime = _duration(ttl)
    if expired:  # beyond the leeway the server grants, so the server answers "Expired access token."
        lifetime = -(int(settings.jwt_leeway) + 60)
    try:
        secret = signing_secret(settings, create=create_secret)
    except FileNotFoundError:
        raise click.ClickException(
            f"no signing secret: set CE_JWT_SECRET, or start `serve` once with this CE_DATA_DIR "
            f"({settings.data_dir}), or pass --create-secret"
        ) from None
    if secret is None:
        raise click.ClickException(
            "tokens are verified with a public key or JWKS here; mint them with your identity provider"
        )
    granted = [scope for value in scopes for scope in value.split()]
    click.echo(
        mint_token(
            secret,
            org,
            scopes=granted,
            ttl=lifetime,
            subject=subject,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    )


# -------------------------------------------------------------------------------------------------- db


@main.group(name="db")
def db_group() -> None:
    """Database schema migrations."""


@db_group.command()
@click.option("--revision", default="head", show_default=True)
@needs_server
def upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from ..storage import db

    settings = _settings()
    db.upgrade(settings.database_url, revision)
    click.echo(f"database at {revision}: {_redact(settings.database_url)}")


@db_group.command()
@click.argument("revision")
@needs_server
def downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (``base`` removes every table)."""
    from ..storage import db

    settings = _settings()
    db.downgrade(settings.database_url, revision)
    click.echo(f"database at {revision}: {_redact(settings.database_url)}")


# --------------------------------------------------------------------------------------------- catalog


@main.group()
def catalog() -> None:
    """Catalog files: import and export the images an operator publishes."""


@catalog.command(name="import")
@click.argument("file", type=click.File("rb"))
@click.option("--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--prune", is_flag=True, help="Also delete Public images that are not in FILE.")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Report format.",
)
@needs_server
def import_(file: Any, dry_run: bool, prune: bool, output: str) -> None:
    """Create or update the images in FILE (YAML or JSON list) in one transaction; idempotent."""
    from ..server.errors import ApiError, RequestInvalid
    from ..storage import catalog_files, db

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
    except RequestInvalid as exc:
        for item in exc.details:
            click.echo(f"{file.name}: {item.field}: {item.reason} (got {item.originalValue!r})", err=True)
        omitted = getattr(exc, "omitted", 0)
        if omitted:
            click.echo(f"{file.name}: … and {omitted:,} more problems", err=True)
        raise SystemExit(3) from None
    except ApiError as exc:
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
@click.option(
    "-o",
    "--output",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    help="File format written to stdout.",
)
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


# ----------------------------------------------------------------------------------------------- audit


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
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="A line per change, or JSON.",
)
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
