"""The processes a benchmark starts and measures: CPU pinning, children in their own process group, the
store a size runs on, ``cluster-engine serve`` / ``catalog import`` / ``token``, RSS and CPU from /proc."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from cluster_engine.server.pids import descendants
from cluster_engine.testing import free_port

from .common import CLUSTER_ENGINE, JWT_SECRET, BenchError, log
from .report import mib

SET_BY_BENCH = {"CE_DATA_DIR", "CE_DATABASE_URL", "CE_JWT_SECRET"}
DROPPED_BY_BENCH = {"CE_JWT_PUBLIC_KEY", "CE_JWT_JWKS", "CE_JWT_ISSUER", "CE_JWT_AUDIENCE"}


@dataclasses.dataclass
class Cores:
    server: list[str]  # prefix for server processes, e.g. ["taskset", "-c", "0"]
    load: list[str]
    description: str

    @classmethod
    def detect(cls) -> Cores:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cpus) >= 2 and shutil.which("taskset"):
            return cls(
                ["taskset", "-c", str(cpus[0])],
                ["taskset", "-c", str(cpus[1])],
                f"servers pinned to CPU {cpus[0]}, wrk to CPU {cpus[1]} ({len(cpus)} CPUs available)",
            )
        return cls([], [], f"not pinned ({len(cpus) or os.cpu_count()} CPU(s) available)")


class Process:
    """A child in its own process group; ``stop`` takes the whole group down (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log_file:
            self.popen = subprocess.Popen(
                list(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; make sure no straggler of its group survives it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            return


def rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time so far (user + system), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, process: Process, timeout: float, expect: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}")
        try:
            response = httpx.get(url, timeout=5.0)
            if response.status_code == expect:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = exc.__class__.__name__
        time.sleep(0.1)
    raise BenchError(
        f"{process.name} not ready at {url} after {timeout:.0f}s ({last}):\n{process.log_tail()}"
    )


def run_checked(argv: Sequence[str], env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} … failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def run_measured(
    argv: Sequence[str], env: dict[str, str], timeout: float, workdir: Path
) -> tuple[str, float, int]:
    """Run to completion; return (stdout, wall seconds, peak RSS in KiB) — the peak from ``wait4``."""
    out_path, err_path = workdir / "measured.out", workdir / "measured.err"
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        popen = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{' '.join(argv[:4])} … still running after {timeout:.0f}s")
            time.sleep(0.05)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(popen.pid, 0)
        raise
    popen.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    if popen.returncode != 0:
        detail = err_path.read_text(errors="replace")[-3000:]
        raise BenchError(
            f"{' '.join(argv[:4])} … failed ({popen.returncode}) after {elapsed:.1f}s,"
            f" peak RSS {usage.ru_maxrss / 1024:.0f} MiB:\n{detail}"
        )
    return out_path.read_text(errors="replace"), elapsed, usage.ru_maxrss


class Store:
    """Where the service's database lives for one N: a fresh SQLite file or a fresh PostgreSQL database."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.pg: Any = None

    def __enter__(self) -> Store:
        if self.kind == "postgresql":
            from cluster_engine.testing.pgserver import PostgresServer

            log("starting a throwaway PostgreSQL server")
            self.pg = PostgresServer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.pg is not None:
            self.pg.destroy()

    def env_for(self, n: int) -> dict[str, str]:
        data_dir = self.workdir / f"data-{n}"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CE_DATA_DIR": str(data_dir), "CE_JWT_SECRET": JWT_SECRET}
        for key in DROPPED_BY_BENCH:
            env.pop(key, None)
        if self.kind == "postgresql":
            env["CE_DATABASE_URL"] = self.pg.create_database()
        else:
            env["CE_DATABASE_URL"] = f"sqlite:///{data_dir / 'cluster-engine.db'}"
        return env


@dataclasses.dataclass(frozen=True)
class Imported:
    """One ``cluster-engine catalog import`` of a size's catalog file, measured."""

    file_mb: float
    output: str
    seconds: float
    rss_kib: int

    COLUMNS = ("catalog file MB", "import s", "import peak RSS MiB", "import result")

    def cells(self) -> list[str]:
        return [f"{self.file_mb:.1f}", f"{self.seconds:.1f}", mib(self.rss_kib), self.output]


def size_dir(workdir: Path, n: int) -> tuple[Path, Path]:
    """A size's own directory, and the path of its catalog file there."""
    sizedir = workdir / f"n{n}"
    sizedir.mkdir()
    log(f"N={n}: generating {sizedir / 'catalog.json'}")
    return sizedir, sizedir / "catalog.json"


def import_catalog(n: int, store: Store, env: dict[str, str], path: Path, sizedir: Path) -> Imported:
    """Migrate a PostgreSQL store, then import the catalog file ``path`` with ``cluster-engine catalog
    import``, measured: its output, its seconds and its peak RSS."""
    file_mb = path.stat().st_size / 1e6
    if store.kind == "postgresql":
        run_checked([CLUSTER_ENGINE, "db", "upgrade"], env, timeout=300)
    log(f"N={n}: importing {file_mb:.1f} MB with `cluster-engine catalog import`")
    output, seconds, rss = run_measured(
        [CLUSTER_ENGINE, "catalog", "import", str(path)], env, 6 * 3600, sizedir
    )
    log(f"N={n}: import took {seconds:.1f}s (peak RSS {rss / 1024:.0f} MiB): {output.strip()}")
    return Imported(file_mb, output.strip(), seconds, rss)


def cli_token(env: dict[str, str], org: object) -> str:
    """A token for ``org`` minted by ``cluster-engine token`` with the service's settings."""
    return run_checked([CLUSTER_ENGINE, "token", "--org", str(org), "--ttl", "12h"], env, 60).strip()


def start_service(env: dict[str, str], cores: Cores, workdir: Path, n: int) -> tuple[Process, str, float]:
    """``cluster-engine serve`` on a free port, pinned; (process, base URL, seconds until /readyz)."""
    port = free_port()
    argv = [*cores.server, CLUSTER_ENGINE, "serve", "--port", str(port), "--log-level", "warning"]
    started = time.monotonic()
    service = Process("cluster-engine serve", argv, env, workdir / f"service-{n}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz", service, timeout=120 + n / 2000)
    except BaseException:
        service.stop()
        raise
    return service, base, time.monotonic() - started


def worker_pid(service: Process) -> int | None:
    """The service's worker: its largest descendant."""
    children = descendants(service.pid)
    return max(children, key=lambda pid: rss_kib(pid) or 0) if children else None


def worker_rss(service: Process) -> tuple[int | None, int | None]:
    """(the worker's RSS, the main process's RSS) in KiB."""
    worker = worker_pid(service)
    return (rss_kib(worker) if worker else None), rss_kib(service.pid)
