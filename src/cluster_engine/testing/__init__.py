"""Run a real cluster-engine server for tests: a process on a free loopback port with its own database.

Used by this project's own test suite and meant for anyone who tests code against the Images API::

    with LiveServer.start(tmp_path) as server:
        token = server.token(org_id)
        httpx.get(f"{server.url}/v1/images", headers={"Authorization": f"Bearer {token}"})
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import yaml

from ..server.auth import mint_token
from .samples import image_body as image_body  # the sample image body, for test authors

T = TypeVar("T")


def _die_with_parent() -> None:
    """In the server process, before exec: on Linux, get SIGTERM when the test process dies, so a killed
    test run leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path
    secret: str
    _clients: list[httpx.Client] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *,
        database_url: str | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        host: str = "127.0.0.1",
        timeout: float = 30.0,
        python: str | None = None,
    ) -> LiveServer:
        """``python``: the interpreter whose cluster-engine to run (default: this one's)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port(host)
        secret = secrets.token_urlsafe(48)
        full_env = {
            # the caller's own CE_* settings (a JWKS, a production database) are not this server's
            **{k: v for k, v in os.environ.items() if not k.startswith("CE_")},
            "CE_DATA_DIR": str(data_dir),
            "CE_DATABASE_URL": database_url or f"sqlite:///{data_dir / 'cluster-engine.db'}",
            "CE_JWT_SECRET": secret,
            "CE_POLL_INTERVAL": "0.05",
            **(env or {}),
        }
        log_path = data_dir / f"server-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    python or sys.executable,
                    "-m",
                    "cluster_engine",
                    "serve",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    *args,
                ],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() can take the workers down too
                preexec_fn=_die_with_parent,
            )
        shown = f"[{host}]" if ":" in host else host
        server = cls(
            url=f"http://{shown}:{port}",
            data_dir=data_dir,
            env=full_env,
            process=process,
            log_path=log_path,
            secret=full_env["CE_JWT_SECRET"],
        )
        try:
            server._wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close_clients(self) -> None:
        """Close every client ``client()`` made (and their keep-alive connections): a server shared by
        many tests would otherwise hold every earlier test's idle connections."""
        for client in self._clients:
            client.close()
        self._clients.clear()

    def stop(self, timeout: float = 10.0) -> int | None:
        self.close_clients()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # any worker that outlived its server
        return self.process.returncode

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------- helpers

    def token(self, org_id: uuid.UUID | str, *, scopes: Sequence[str] = (), ttl: float = 3600) -> str:
        return mint_token(self.secret, uuid.UUID(str(org_id)), scopes=list(scopes), ttl=ttl)

    def client(self, org_id: uuid.UUID | str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token(org_id)}"} if org_id is not None else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=10, **kwargs)
        self._clients.append(client)
        return client

    def cli(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cluster-engine ARGS`` against this server's database and settings."""
        return subprocess.run(
            [sys.executable, "-m", "cluster_engine", *args],
            env=self.env,
            input=input,
            text=True,
            capture_output=True,
            check=check,
            timeout=60,
        )

    def import_catalog(self, entries: Any, *extra: str) -> str:
        """Import catalog entries through the CLI, then wait until the server serves the new revision."""
        path = self.data_dir / f"catalog-{uuid.uuid4().hex}.yaml"
        path.write_text(yaml.safe_dump(entries, sort_keys=False))
        result = self.cli("catalog", "import", str(path), *extra)
        self.wait_synced()
        return result.stdout

    @property
    def database_url(self) -> str:
        return self.env["CE_DATABASE_URL"]

    def wait_synced(self, timeout: float = 5.0) -> int:
        """Wait until the server's read model reflects the database's current revision; return it."""
        return wait_synced(self.url, self.database_url, timeout)


def run_sync(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``work()`` to completion on an event loop of its own, in a thread of its own, so
    that it works the same from plain code and from inside a running event loop (async tests)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(work())).result()


def wait_synced(url: str, database_url: str, timeout: float = 5.0) -> int:
    """Wait until the server at ``url`` serves the current revision of ``database_url``; return it."""
    from .stores import in_store

    target = in_store(database_url, lambda store: store.revision())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/readyz", timeout=2).json()
        if body.get("revision", -1) >= target:
            return target
        time.sleep(0.02)
    raise TimeoutError(f"server did not reach revision {target} within {timeout}s")


@dataclass
class ExistingServer:
    """A server something else started (``pytest --cluster-engine-url``): the same ``url``, ``token()`` and
    ``wait_synced()`` as ``LiveServer`` where what they need was given. Tokens are minted with ``secret``
    (the server's CE_JWT_SECRET), or the one ready ``fixed_token`` is used; ``database_url`` (the server's
    database) is what catalog imports and ``wait_synced`` need."""

    url: str
    secret: str | None = None
    fixed_token: str | None = None
    database_url: str | None = None

    def token(self, org_id: uuid.UUID | str, *, scopes: Sequence[str] = (), ttl: float = 3600) -> str:
        if self.secret is not None:
            return mint_token(self.secret, uuid.UUID(str(org_id)), scopes=list(scopes), ttl=ttl)
        if self.fixed_token is not None:
            return self.fixed_token
        raise RuntimeError("no way to make tokens: give --cluster-engine-secret or --cluster-engine-token")

    def wait_synced(self, timeout: float = 5.0) -> int:
        if self.database_url is None:
            raise RuntimeError("this needs the server's database: --cluster-engine-database-url")
        return wait_synced(self.url, self.database_url, timeout)
