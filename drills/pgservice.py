"""What the soak and faults drills share beyond common.py: a seeded service (2 workers) on a throwaway,
durable PostgreSQL, a closed-loop capacity measurement, a sampler of every worker's RSS and open file
descriptors, and a way to fold several loads' ledgers into one for ``verify_ledger``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster_engine.testing import LiveServer
from cluster_engine.testing.pgserver import PostgresServer

from .common import Ledger, Load, open_fds, rss_mib, seed_catalog, worker_pids

WORKERS = 2
ORGS = 20


@dataclass
class Service:
    """A cluster-engine server (``WORKERS`` workers) on its own PostgreSQL server and database."""

    pg: PostgresServer
    database_url: str
    server: LiveServer
    seed: int = 0  # every Load gets its own seed: image names derive from it and must not repeat

    def load(self, **kwargs: Any) -> Load:
        self.seed += 1
        return Load(targets=[self.server.url], secret=self.server.secret, orgs=ORGS, seed=self.seed, **kwargs)


@contextlib.contextmanager
def pg_service(workdir: Path, *, env: dict[str, str] | None = None) -> Iterator[Service]:
    """Start a durable PostgreSQL (it gets killed), a migrated database, the server, and seed the catalog
    (60 Public images, 10 Customized for each of 20 orgs); tear all of it down afterwards."""
    pg = PostgresServer.start(durable=True)
    server: LiveServer | None = None
    try:
        url = pg.create_database()
        server = LiveServer.start(
            workdir / "server",
            database_url=url,
            args=["--workers", str(WORKERS), "--migrate"],
            env=env or {},
            timeout=60,
        )
        catalog = seed_catalog(workdir / "catalog.json", orgs=ORGS)
        server.cli("catalog", "import", str(catalog))
        server.wait_synced(timeout=10)
        yield Service(pg=pg, database_url=url, server=server)
    finally:
        if server is not None:
            server.stop()
        pg.destroy()


@dataclass
class Capacity:
    rate: float  # requests/s, every answer counted
    load: Load
    seconds: float
    concurrency: int
    client_cpu: float  # share of one core the drill's own process (the load generator) used
    workers_cpu: float  # share of one core the workers used, summed

    def describe(self) -> str:
        return (
            f"{self.rate:.0f} req/s ({self.concurrency} connections, {self.seconds:.0f} s after a warm-up; "
            f"CPU: load generator {self.client_cpu:.0%} of a core, workers {self.workers_cpu:.0%})"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def measure_capacity(
    service: Service, seconds: float, concurrency: int = 32, warmup: float = 2.0
) -> Capacity:
    """Closed-loop throughput of the mixed load at ``concurrency`` over ``seconds`` after ``warmup`` (org
    shelves loaded, caches filled), and who used the CPU meanwhile (on a small machine the load generator
    shares the cores with the workers)."""
    load = service.load(concurrency=concurrency)
    pids = worker_pids(service.server)
    marks: list[tuple[float, float, float]] = []

    def mark() -> None:
        marks.append((time.monotonic(), time.process_time(), sum(map(cpu_seconds, pids))))

    timer = threading.Timer(warmup, mark)
    timer.start()
    load.run(warmup + seconds)
    timer.cancel()
    mark()
    if len(marks) < 2:
        marks.insert(0, marks[0])
    (t0, client0, workers0), (t1, client1, workers1) = marks
    elapsed = max(t1 - t0, 1e-9)
    measured = [o for o in load.outcomes if o.started >= warmup]
    return Capacity(
        rate=len(measured) / seconds,
        load=load,
        seconds=seconds,
        concurrency=concurrency,
        client_cpu=(client1 - client0) / elapsed,
        workers_cpu=(workers1 - workers0) / elapsed,
    )


def merge_ledgers(ledgers: Sequence[Ledger]) -> Ledger:
    """One ledger for several loads (each with its own seed, so their image names never collide)."""
    merged = Ledger()
    for ledger in ledgers:
        merged.created.update(ledger.created)
        merged.uncertain_names |= ledger.uncertain_names
        merged.deleted |= ledger.deleted
        merged.uncertain_deletes |= ledger.uncertain_deletes
    return merged


def load_started(load: Load, timeout: float = 30.0) -> float:
    """The monotonic time ``load`` counts its outcomes' ``started`` from, once its run has begun."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        start = getattr(load, "_start", None)
        if start is not None:
            return float(start)
        time.sleep(0.005)
    raise TimeoutError("the load did not start")


@dataclass
class Sample:
    at: float  # seconds since the load began
    rss: dict[int, float | None]  # worker pid -> RSS MiB
    fds: dict[int, int | None]  # worker pid -> open file descriptors


@dataclass
class Sampler:
    """Samples every worker's RSS and open fds every ``every`` seconds in a thread, timed like ``load``."""

    server: LiveServer
    load: Load
    every: float = 5.0
    samples: list[Sample] = field(default_factory=list)
    pids_seen: list[int] = field(default_factory=list)  # in order of first sight

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        start = load_started(self.load)
        while not self._stop.is_set():
            pids = sorted(worker_pids(self.server))
            for pid in pids:
                if pid not in self.pids_seen:
                    self.pids_seen.append(pid)
            self.samples.append(
                Sample(
                    at=time.monotonic() - start,
                    rss={pid: rss_mib(pid) for pid in pids},
                    fds={pid: open_fds(pid) for pid in pids},
                )
            )
            self._stop.wait(self.every)
