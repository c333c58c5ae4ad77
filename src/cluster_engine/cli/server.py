"""The server commands: ``serve`` (Granian and its workers, ``worker_app``) and ``token``."""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import click

from ..server import logformat
from ..server.config import ConfigError, Settings, load_settings
from .main import (
    DEMO_ORG,
    _configure_logging,
    _load_demo,
    _program,
    _redact,
    _settings,
    _with_store,
    log,
    main,
    needs_server,
)

# The server stack (SQLAlchemy, JWT, the store) is imported inside the commands that use it, so that
# client commands such as `cluster-engine images list` start quickly.


def worker_app() -> Any:
    """Granian's factory target: each worker process builds its app from the same environment (the ASGI
    application, or with CE_SERVER_INTERFACE=rsgi the RSGI service around it)."""
    from ..server.app import build
    from ..server.connguard import ConnectionGuard

    settings = load_settings(os.environ)
    _configure_logging(os.environ.get("CE_LOG_LEVEL", "info"), settings)
    ConnectionGuard.start(settings.max_connections)  # idle ones closed first, then 503s, at the budget
    served = build(settings)
    if settings.server_interface == "rsgi":
        from ..server.rsgi import RsgiService

        return RsgiService(served)
    return served.asgi


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
    if workers > 1:  # the workers share their change polls (one replica, one answer: revisionboard.py)
        from ..server import revisionboard

        revisionboard.share_with_workers()
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
            "cluster_engine.cli.server:worker_app",
            factory=True,
            address=host,
            port=port,
            interface=Interfaces.RSGI if settings.server_interface == "rsgi" else Interfaces.ASGI,
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
