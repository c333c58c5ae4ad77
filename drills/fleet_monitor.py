"""The fleet drill's connection monitor: a process of its own that counts the server's client backends every
50 ms on the ``postgres`` database, opens a new connection every 0.5 s besides (the drill itself must
always be able to connect: the failure that started this was a fleet that took every connection slot), and,
when the fleet goes through PgBouncer, reads PgBouncer's ``SHOW POOLS`` every 0.5 s on its admin console.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

SAMPLE_EVERY = 0.05  # s between connection counts
PROBE_EVERY = 0.5  # s between new monitoring connections (and PgBouncer's SHOW POOLS)
MONITOR_APP = "ce-fleet-drill-monitor"
CONNECT_TIMEOUT = 10  # s for the monitor's connections; a slow one is a figure, a refused one a failure
COUNT_QUERY = (
    "SELECT count(*), count(*) FILTER (WHERE datname = %s) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend'"
)
XACT_QUERY = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s"
POOL_COLUMNS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "maxwait")


@dataclass
class Sample:
    at: float  # s since the drill's clock started
    total: int  # every client backend, the monitor's own included
    fleet: int  # client backends on the service's database


REFUSALS = ("too many clients", "remaining connection slots", "no more connections allowed")


@dataclass
class PoolSample:
    """PgBouncer's ``SHOW POOLS`` for the service's database (summed over its users)."""

    at: float
    cl_active: int  # client connections paired with a server connection or idle between transactions
    cl_waiting: int  # clients waiting for a server connection
    sv_active: int
    sv_idle: int
    sv_used: int
    maxwait: int  # s the oldest waiting client has waited


def _pools(conn: psycopg.Connection[Any], database: str) -> tuple[int, ...]:
    cursor = conn.cursor()
    cursor.execute("SHOW POOLS")
    names = [c.name for c in cursor.description or ()]
    totals = [0] * len(POOL_COLUMNS)
    for row in cursor.fetchall():
        values = dict(zip(names, row, strict=True))
        if values.get("database") == database:
            for i, column in enumerate(POOL_COLUMNS):
                totals[i] += int(values.get(column) or 0)
    return tuple(totals)


def _monitor_main(
    url: str, database: str, t0: float, stop: Any, out: Any, bouncer_admin: str | None = None
) -> None:
    """The monitor's own process (so that neither the drill's load generator nor its threads delay it;
    CLOCK_MONOTONIC is the same in every process): count client backends every ``SAMPLE_EVERY`` s on one
    connection (reconnecting if it drops), open a new connection every ``PROBE_EVERY`` s, and send what
    it saw through ``out`` when ``stop`` is set."""
    samples: list[tuple[float, int, int]] = []
    refused: list[str] = []  # the server said no (no connection slot left)
    failed: list[str] = []  # no connection for another reason (a timeout: the machine is overloaded)
    errors: list[str] = []  # a sample failed on an open connection
    connect_times: list[float] = []

    def connect(what: str) -> psycopg.Connection[Any] | None:
        began = time.monotonic()
        try:
            conn = psycopg.connect(
                url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name=MONITOR_APP
            )
        except psycopg.Error as exc:
            text = f"{began - t0:.2f} s, {what}: {str(exc).strip()}"[:300]
            (refused if any(r in str(exc) for r in REFUSALS) else failed).append(text)
            return None
        connect_times.append(time.monotonic() - began)
        return conn

    pools: list[tuple[float, ...]] = []
    pool_errors: list[str] = []  # SHOW POOLS failed: PgBouncer is down (restarted) or refused
    admin: psycopg.Connection[Any] | None = None

    def sample_pools() -> None:
        nonlocal admin
        assert bouncer_admin is not None
        try:
            if admin is None:
                admin = psycopg.connect(
                    bouncer_admin, autocommit=True, connect_timeout=2, cursor_factory=psycopg.ClientCursor
                )
            pools.append((time.monotonic() - t0, *_pools(admin, database)))
        except psycopg.Error as exc:
            pool_errors.append(f"{time.monotonic() - t0:.2f} s: {str(exc).strip()}"[:200])
            if admin is not None:
                with contextlib.suppress(Exception):
                    admin.close()
            admin = None

    conn = connect("sampling connection")
    out.send("started")
    next_probe = time.monotonic()
    while not stop.is_set():
        began = time.monotonic()
        if conn is None:
            conn = connect("sampling connection")
        if conn is not None:
            try:
                row = conn.execute(COUNT_QUERY, (database,)).fetchone()
                assert row is not None
                samples.append((time.monotonic() - t0, int(row[0]), int(row[1])))
            except psycopg.Error as exc:
                errors.append(f"{began - t0:.2f} s: {str(exc).strip()}"[:300])
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
        if began >= next_probe:
            next_probe = began + PROBE_EVERY
            probe = connect("new connection")
            if probe is not None:
                with contextlib.suppress(psycopg.Error):
                    probe.execute("SELECT 1")
                probe.close()
            if bouncer_admin is not None:
                sample_pools()
        stop.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - began)))
    for open_conn in (conn, admin):
        if open_conn is not None:
            open_conn.close()
    out.send(
        {
            "samples": samples,
            "refused": refused,
            "failed": failed,
            "errors": errors,
            "connect_times": connect_times,
            "pools": pools,
            "pool_errors": pool_errors,
        }
    )


@dataclass
class Monitor:
    """Samples the server's client backends from a process of its own, on the ``postgres`` database."""

    url: str
    database: str
    t0: float
    samples: list[Sample] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connect_times: list[float] = field(default_factory=list)  # s, of each connection it opened
    bouncer_admin: str | None = None  # PgBouncer's admin console, when the fleet goes through one
    pools: list[PoolSample] = field(default_factory=list)
    pool_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_monitor_main,
            args=(self.url, self.database, self.t0, self._stop, send, self.bouncer_admin),
            name="fleet-monitor",
            daemon=True,
        )

    def __enter__(self) -> Monitor:
        self._process.start()
        if not self._receive.poll(60) or self._receive.recv() != "started":
            self._process.kill()
            raise RuntimeError("the monitor process did not start")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._receive.poll(30):
            seen = self._receive.recv()
            self.samples = [Sample(*row) for row in seen["samples"]]
            self.refused, self.failed = seen["refused"], seen["failed"]
            self.errors, self.connect_times = seen["errors"], seen["connect_times"]
            self.pools = [PoolSample(*row) for row in seen["pools"]]
            self.pool_errors = seen["pool_errors"]
        else:
            self.errors.append("the monitor process sent nothing back")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    @property
    def probes(self) -> int:
        return len(self.connect_times) + len(self.refused) + len(self.failed)

    def xacts(self) -> int:
        """Transactions committed and rolled back on the service's database so far (a connection of the
        drill's own, on the ``postgres`` database)."""
        with psycopg.connect(
            self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name=MONITOR_APP
        ) as conn:
            row = conn.execute(XACT_QUERY, (self.database,)).fetchone()
        assert row is not None
        return int(row[0])

    def between(self, low: float, high: float) -> list[Sample]:
        return [s for s in self.samples if low <= s.at < high]
