"""A throwaway PgBouncer in front of a PostgreSQL server, for tests, benchmarks and drills.

``PgBouncer.start(upstream_port)`` writes a configuration into a fresh temporary directory and starts
Debian's ``pgbouncer`` on a free loopback port: transaction pooling (``pool_mode = transaction``), every
database of the upstream server (``* =``), and trust authentication like ``PostgresServer``'s (the user
must still be listed in ``auth_file``: ``postgres``). As root it runs as the ``postgres`` OS user, since
PgBouncer refuses to run as root. ``url(database_url)`` turns a direct URL into one through the pooler,
with the service's ``pgbouncer=true`` marker (see ``db.uses_pgbouncer``). Set ``CE_PGBOUNCER_BIN`` to the
binary when it is not ``pgbouncer`` on PATH or ``/usr/sbin/pgbouncer``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import make_url

from . import free_port
from .pgserver import owned_directory


class PgBouncerUnavailable(RuntimeError):
    """No pgbouncer binary could be found on this machine."""


def find_pgbouncer(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    candidates = [env.get("CE_PGBOUNCER_BIN", ""), shutil.which("pgbouncer") or "", "/usr/sbin/pgbouncer"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise PgBouncerUnavailable("pgbouncer not found (apt-get install pgbouncer, or set CE_PGBOUNCER_BIN)")


def version(binary: Path | None = None) -> str:
    """``pgbouncer --version``'s first line, e.g. ``PgBouncer 1.18.0``."""
    result = subprocess.run(
        [str(binary or find_pgbouncer()), "--version"], capture_output=True, text=True, timeout=10
    )
    return result.stdout.splitlines()[0].strip() if result.stdout else ""


def _quoted(value: str) -> str:
    return value.replace('"', '""')  # auth_file's quoting


@dataclass
class PgBouncer:
    binary: Path
    directory: Path
    port: int
    upstream_port: int
    user: str | None  # the OS user to run as (None: the current user)
    settings: dict[str, str]
    upstream_host: str = "127.0.0.1"
    users: dict[str, str] = field(default_factory=lambda: {"postgres": ""})
    databases: dict[str, str] = field(default_factory=dict)  # empty: every database of the upstream
    process: subprocess.Popen[bytes] | None = None

    # Small pools that give idle server connections back soon: a test suite makes a database per test,
    # and each gets a pool of its own; max_user_connections keeps the sum under the server's
    # max_connections (PgBouncer queues clients instead of the server refusing them).
    DEFAULTS = {  # noqa: RUF012 - read-only
        "pool_mode": "transaction",
        "default_pool_size": "10",
        "max_client_conn": "2000",
        "max_user_connections": "150",
        "server_idle_timeout": "5",
        "server_lifetime": "3600",
        "server_login_retry": "1",
        "query_wait_timeout": "30",
    }

    @classmethod
    def start(
        cls,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        databases: Mapping[str, str] | None = None,
        users: Mapping[str, str] | None = None,
        settings: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> PgBouncer:
        """Start PgBouncer for the server on ``upstream_host:upstream_port`` (retrying on another port if
        the free one was taken meanwhile). ``users`` is its ``auth_file``: the user names it accepts and
        their passwords, which it also logs into the server with (default: ``postgres`` without one, as
        ``PostgresServer``'s trust authentication needs; clients need none with the default
        ``auth_type = trust``); ``settings`` override the ``[pgbouncer]`` section's, except the port
        and files; ``databases`` its ``[databases]`` section (default: ``*``, every database of the
        upstream server)."""
        binary = find_pgbouncer()
        user = "postgres" if os.geteuid() == 0 else None
        directory = owned_directory("ce-pgbouncer-", user)
        bouncer = cls(
            binary=binary,
            directory=directory,
            port=0,
            upstream_port=upstream_port,
            user=user,
            settings={**cls.DEFAULTS, **(settings or {})},
            upstream_host=upstream_host,
            users=dict(users or {"postgres": ""}),
            databases=dict(databases or {}),
        )
        last: Exception | None = None
        for _attempt in range(5):
            bouncer.port = free_port()
            try:
                bouncer.start_again(timeout)
                return bouncer
            except RuntimeError as exc:  # most likely the port was taken between probe and bind
                last = exc
        bouncer.destroy()
        raise RuntimeError(f"pgbouncer did not start: {last}")

    @property
    def config_path(self) -> Path:
        return self.directory / "pgbouncer.ini"

    @property
    def log_path(self) -> Path:
        return self.directory / "pgbouncer.log"

    def _write_config(self) -> None:
        settings = {
            "listen_addr": "127.0.0.1",
            "unix_socket_dir": "",
            "auth_type": "trust",
            "admin_users": ",".join(self.users),
            **self.settings,
            # where and how it runs are this helper's
            "listen_port": str(self.port),
            "auth_file": str(self.directory / "userlist.txt"),
            "logfile": str(self.log_path),
            "pidfile": str(self.directory / "pgbouncer.pid"),
        }
        databases = self.databases or {"*": f"host={self.upstream_host} port={self.upstream_port}"}
        lines = [
            "[databases]",
            *(f"{name} = {connect}" for name, connect in databases.items()),
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        (self.directory / "userlist.txt").write_text(
            "".join(f'"{_quoted(user)}" "{_quoted(password)}"\n' for user, password in self.users.items())
        )
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.config_path, self.directory / "userlist.txt"):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start_again(self, timeout: float = 30.0) -> None:
        """Start (or restart) PgBouncer on its port and wait until it accepts connections."""
        self._write_config()
        self.process = subprocess.Popen(
            [str(self.binary), "-q", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"pgbouncer exited ({self.process.returncode}):\n{log}")
            with socket.socket() as sock:
                sock.settimeout(1)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"pgbouncer not accepting connections after {timeout}s")

    def url(self, database_url: str) -> str:
        """The URL of the same database and user through this PgBouncer, marked ``pgbouncer=true``."""
        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        url = url.update_query_dict({"pgbouncer": "true"})
        return url.render_as_string(hide_password=False)

    @property
    def admin_url(self) -> str:
        """PgBouncer's admin console (``SHOW POOLS``, ``KILL``, ``RECONNECT``…), as the first user: simple
        queries only."""
        user, password = next(iter(self.users.items()))
        secret = f":{quote(password, safe='')}" if password else ""
        return f"postgresql://{quote(user, safe='')}{secret}@127.0.0.1:{self.port}/pgbouncer"

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run one admin console command; its rows as dicts."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(
            self.admin_url,
            autocommit=True,
            connect_timeout=5,
            cursor_factory=psycopg.ClientCursor,
        ) as conn:
            cursor = conn.cursor(row_factory=dict_row)
            cursor.execute(command)
            return list(cursor.fetchall()) if cursor.description else []

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # 1.18: immediate shutdown (SIGINT waits for queries)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()
