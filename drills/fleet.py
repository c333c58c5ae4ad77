"""Fleet: many replicas of the service on one stock PostgreSQL (``max_connections = 100``), first directly,
then through PgBouncer in transaction-pooling mode, with faults.

One fresh, durable PostgreSQL 15 keeps its stock ``max_connections = 100``. Each topology gets a database
of its own, migrated with ``cluster-engine db upgrade`` and seeded with a small catalog (40 Public images,
10 Customized for each of 30 orgs), and ``R`` replicas of ``cluster-engine serve --workers W`` on loopback
ports, all started at once, with the defaults of the connection budget (``CE_DB_POOL_SIZE`` 1,
``CE_DB_POOL_OVERFLOW`` 1, ``CE_DB_LISTEN`` off), polling every 0.25 s:

- direct (full: 25 x 2 = 50 workers; short: 6 x 2): the workers connect to PostgreSQL itself;
- PgBouncer (full: 25 x 4 = 100 workers; short: 6 x 3): Debian's PgBouncer in transaction pooling with
  ``default_pool_size`` ``BOUNCER_POOL`` (and ``max_db_connections`` the same) in front; the service's URL
  carries ``pgbouncer=true``;
- standby (full: 10 x 2; short: 4 x 2): directly, with a hot standby of the primary (``pg_basebackup -R``,
  streaming) that the odd-numbered replicas (those of a "far" data center) read from
  (``CE_DATABASE_READ_URL``) while they write to the primary.

The three run one after the other in the same drill (one report, one section of docs/reliability.md, one
``--short`` that CI runs), so that their figures come from the same machine, minutes apart.

With writes at about 10/s (Customized creates and deletes by ``images:write`` tokens of the seeded orgs,
Public ones by an ``images:admin`` token, over every replica in service) and steady reads at about 20/s
(each checked like the bursts') throughout:

1. a cold burst: the first request of each of ``new_orgs`` new orgs (fresh tokens) at every replica (full:
   200 x 25 = 5,000 requests), a new connection each so that they spread over the workers, at bounded
   concurrency; then the same from the 30 orgs that own Customized images. Every answer must be a 200 whose
   images are Public or the caller's own, with every seeded image the caller may see;
2. one admin write (a new Public image), after which every replica is polled (a new connection each time,
   so every worker answers) until it lists the image in ``PROPAGATION_HITS`` answers in a row: the
   propagation time of a replica runs from the write's 201 to the sending of the first of those requests
   (and, reported too, to its answer). The promise checked is the freshness bound's: no request sent
   more than 1 s after the 201 gets an answer without the image (on a loaded machine an answer may
   arrive later than that; it must still list the image);
3. the topology's faults (drills/fleet_faults.py), one after another: directly, one replica SIGKILLed (its
   whole process group) and restarted (the short form skips it: the PgBouncer topology has it too);
   through PgBouncer, PgBouncer restarted, then one replica killed and restarted; with the standby, its
   replay paused (an admin write's propagation is timed while it holds: the standby's readers must serve
   it from the primary within the bound) and resumed. After each, once the steady reads have answered
   2xx for a second, another admin write's propagation is timed (the restarted replica included);
4. the writes stop; after a settling pause the fleet sits idle for a window in which the steady
   connections, each worker's RSS, PgBouncer's pools, and the transactions the fleet's polling costs the
   primary (``pg_stat_database.xact_commit + xact_rollback`` of the service's database: its delta over the
   window, divided by the window's length) are measured.

A monitor in a process of its own (drills/fleet_monitor.py) counts PostgreSQL's client backends every 50 ms,
opens a new connection to it every 0.5 s, and reads PgBouncer's ``SHOW POOLS`` every 0.5 s.

Fails on: any answer other than 200/201/204 that no fault excuses (each reported by cause; a PgBouncer
restart excuses 503s with the contract's body until 5 s after it is back, a replica's kill the requests in
flight to it), a list answer showing another org's image or missing a seeded one, a peak of 100 or more
client backends (through PgBouncer: more than its pool and the drill's own), a request sent more than 1 s
after an admin write's 201 whose answer does not list it (or a replica that never does), a killed replica
not ready within 60 s, a monitor connection refused by the server or not open within 10 s, a failed
sample, a worker that did not start, an acknowledged write lost or half-written, or a process left after
the drill.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url

from cluster_engine.server.config import Settings, load_settings
from cluster_engine.server.pids import pid_alive
from cluster_engine.storage import db
from cluster_engine.testing import LiveServer
from cluster_engine.testing.pgbouncer import PgBouncer
from cluster_engine.testing.pgbouncer import version as pgbouncer_version
from cluster_engine.testing.pgserver import PostgresServer

from .common import Ledger, Report, median, org, percentile, rss_mib, seed_catalog, verify_ledger, worker_pids
from .fleet_faults import (
    RECOVERY_LIMIT,
    Fault,
    Fleet,
    PgBouncerRestart,
    Record,
    ReplicaKill,
    StandbyReplayPaused,
    judge,
)
from .fleet_monitor import CONNECT_TIMEOUT, PROBE_EVERY, Monitor, Sample
from .fleet_traffic import (
    ORGS,
    PROPAGATION_HITS,
    PROPAGATION_LIMIT,
    READ_RATE,
    WRITE_RATE,
    Answer,
    Propagation,
    Traffic,
)

NAME = "fleet"
TITLE = (
    "Fleet: 25 x 2 workers directly, 25 x 4 through PgBouncer and 10 x 2 with a hot standby on one stock "
    "PostgreSQL (max_connections 100), with faults"
)

MAX_CONNECTIONS = 100  # PostgreSQL's stock value
POLL_INTERVAL = 0.25  # the service's default CE_POLL_INTERVAL (LiveServer's is 0.05)
PUBLIC, PER_ORG = 40, 10  # the seeded catalog: 40 Public, ORGS x PER_ORG Customized
CLIENT_TIMEOUT = 30.0  # a slow answer shows as its real length, not as a client timeout
QUIET = 1.0  # s of 2xx-only steady reads after a fault before its propagation is timed
BOUNCER_POOL = 20  # PgBouncer's server connections for the service's database
DRILL_OWN = 3  # server connections of the drill itself: the monitor's two, and one counting transactions
BOUNCER_SETTINGS = {
    "default_pool_size": str(BOUNCER_POOL),
    "max_db_connections": str(BOUNCER_POOL),
    "reserve_pool_size": "0",
    "max_client_conn": "1000",
    "server_idle_timeout": "600",  # PgBouncer's default: steady connections are the pool, not a trickle
    "query_wait_timeout": "30",
}


@dataclass(frozen=True)
class Shape:
    replicas: int
    workers: int
    concurrency: int  # connections in flight during the bursts
    ready_timeout: float  # s for the whole fleet to start
    settle: float  # s between the end of the writes and the idle window
    idle: float  # s of the idle window
    new_orgs: int  # orgs of the cold burst, each asking every replica


@dataclass(frozen=True)
class Topology:
    label: str
    shape: Shape
    via_pgbouncer: bool
    faults: tuple[Callable[[], Fault], ...] = ()
    standby: bool = False  # the odd-numbered replicas read from a hot standby (CE_DATABASE_READ_URL)


def topologies(short: bool) -> list[Topology]:
    """Direct, through PgBouncer, with a standby: (replicas, workers) of each, and the timings they share."""
    sizes = ((6, 2), (6, 3), (4, 2)) if short else ((25, 2), (25, 4), (10, 2))
    timings = (32, 120.0, 2.0, 4.0, 100) if short else (64, 300.0, 3.0, 20.0, 200)
    direct, bounced, standby = (Shape(replicas, workers, *timings) for replicas, workers in sizes)
    return [
        Topology("direct", direct, via_pgbouncer=False, faults=() if short else (ReplicaKill,)),
        Topology("PgBouncer", bounced, via_pgbouncer=True, faults=(PgBouncerRestart, ReplicaKill)),
        Topology("standby", standby, via_pgbouncer=False, faults=(StandbyReplayPaused,), standby=True),
    ]


# ------------------------------------------------------------------------------------------ fleet


def _cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cluster_engine", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cluster-engine {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip()


def _launch(
    pool: concurrent.futures.ThreadPoolExecutor, data_dir: Path, url: str, env: dict[str, str], shape: Shape
) -> concurrent.futures.Future[LiveServer]:
    return pool.submit(
        LiveServer.start,
        data_dir,
        database_url=url,
        args=["--workers", str(shape.workers)],
        env=env,
        timeout=shape.ready_timeout,
    )


def start_fleet(
    pool: concurrent.futures.ThreadPoolExecutor,
    workdir: Path,
    url: str,
    env: Callable[[int], dict[str, str]],
    shape: Shape,
) -> tuple[list[LiveServer], list[str]]:
    """Every replica started at once (a thread of ``pool`` each starts one and waits for its /readyz); the
    servers that came up and what went wrong with the others. ``pool`` must outlive the servers: each
    server gets SIGTERM when the thread that started it ends (LiveServer sets PR_SET_PDEATHSIG, which
    follows the forking thread, not the process). ``env(i)`` is replica i's environment."""
    futures = [_launch(pool, workdir / f"replica-{i:02d}", url, env(i), shape) for i in range(shape.replicas)]
    servers: list[LiveServer] = []
    errors: list[str] = []
    for i, future in enumerate(futures):
        try:
            servers.append(future.result())
        except Exception as exc:
            errors.append(f"replica {i} did not start: {type(exc).__name__}: {str(exc)[-600:]}")
    return servers, errors


def started_workers(server: LiveServer) -> int:
    """Workers that finished their start-up (granian logs "Started worker-N" after the app's lifespan
    start, which holds the catalog's preload)."""
    return server.log().count("Started worker-")


def stop_fleet(pool: concurrent.futures.ThreadPoolExecutor, servers: Sequence[LiveServer]) -> list[int]:
    """Stop every replica (all at once) and return the pids still alive afterwards (then killed)."""
    pids = [pid for server in servers for pid in (server.process.pid, *worker_pids(server))]
    list(pool.map(lambda server: server.stop(timeout=20), servers))
    left = [pid for pid in pids if pid_alive(pid) and not _is_zombie(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def _seeded(path: Path) -> tuple[set[str], dict[int, set[str]]]:
    entries = json.loads(path.read_text())
    public = {e["id"] for e in entries if e["type"] == "Public"}
    index = {str(org(i)): i for i in range(ORGS)}
    owned: dict[int, set[str]] = {i: set() for i in range(ORGS)}
    for e in entries:
        if e["type"] == "Customized":
            owned[index[e["orgId"]]].add(e["id"])
    return public, owned


# ------------------------------------------------------------------------------------------ figures


def _provenance() -> str:
    """Which source the figures come from (the drill runs the working tree)."""
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()[1::2]
        if head:
            changed = f", with uncommitted changes to {', '.join(dirty)}" if dirty else ""
            return f"Source: {head}{changed}."
    return "Source: unknown (not a git checkout)."


def _burst(answers: list[Answer], what: str, seconds: float) -> str:
    rate = len(answers) / seconds if seconds else float("nan")
    return f"{len(answers)} {what} in {seconds:.1f} s ({rate:.0f} req/s); {_ms([a.latency for a in answers])}"


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {percentile(values, 0.5) * 1000:.0f} / p99 {percentile(values, 0.99) * 1000:.0f} / "
        f"max {max(values) * 1000:.0f} ms"
    )


def _peak(samples: Sequence[Sample]) -> str:
    if not samples:
        return "no samples"
    top = max(samples, key=lambda s: s.total)
    return f"{top.total} ({top.fleet} the fleet's, at {top.at:.1f} s)"


def _by_status(answers: Sequence[Answer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in answers:
        key = str(a.status or "no answer")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------ the drill


def run(workdir: Path, *, short: bool) -> Report:
    report = Report()
    t0 = time.monotonic()
    pg = PostgresServer.start(durable=True, max_connections=MAX_CONNECTIONS)
    try:
        with psycopg.connect(pg.url, autocommit=True, connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            max_conn = conn.execute("SHOW max_connections").fetchone()
        report.figures["PostgreSQL"] = (
            f"{version[0] if version else '?'} (durable), "
            f"max_connections {max_conn[0] if max_conn else '?'}; "
            f"{pgbouncer_version()} in transaction pooling, default_pool_size {BOUNCER_POOL} "
            f"(max_db_connections {BOUNCER_POOL}, reserve 0); machine: {os.cpu_count()} CPUs, "
            f"{_meminfo('MemTotal') / 1024:.0f} MiB of memory"
        )
        for topology in topologies(short):
            run_topology(workdir / topology.label.lower(), pg, topology, report, t0)
    finally:
        pg.destroy()
    report.figures["duration"] = f"{time.monotonic() - t0:.0f} s"
    report.details.append(_provenance())
    return report


@dataclass
class Marks:
    t0: float
    at: dict[str, float] = field(default_factory=dict)  # s since t0

    def __call__(self, name: str) -> None:
        self.at[name] = time.monotonic() - self.t0

    def __getitem__(self, name: str) -> float:
        return self.at[name]


def run_topology(workdir: Path, pg: PostgresServer, topology: Topology, report: Report, t0: float) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    shape = topology.shape
    prefix = f"{topology.label}: "
    figures: dict[str, Any] = {}
    mark = Marks(t0)
    secret = secrets.token_urlsafe(48)
    env = {"CE_JWT_SECRET": secret, "CE_POLL_INTERVAL": str(POLL_INTERVAL)}
    settings = load_settings({**os.environ, **env, "CE_DATABASE_URL": "postgresql://x/y"})
    # the threads that start the servers live until the servers are stopped (see start_fleet)
    pool = concurrent.futures.ThreadPoolExecutor(shape.replicas + 1, thread_name_prefix="replica")
    servers: list[LiveServer] = []
    ledger: Ledger | None = None  # the writes', once they begin
    url: str | None = None
    bouncer: PgBouncer | None = None
    standby: PostgresServer | None = None
    try:
        url = pg.create_database()
        database = url.rsplit("/", 1)[1]
        cli_env = {**os.environ, **env, "CE_DATABASE_URL": url, "CE_DATA_DIR": str(workdir / "cli")}
        _cli(cli_env, "db", "upgrade")
        catalog = seed_catalog(workdir / "catalog.json", public=PUBLIC, orgs=ORGS, per_org=PER_ORG)
        imported = _cli(cli_env, "catalog", "import", str(catalog))
        public_ids, owned_ids = _seeded(catalog)
        if topology.via_pgbouncer:
            bouncer = PgBouncer.start(pg.port, settings=BOUNCER_SETTINGS)
        service_url = bouncer.url(url) if bouncer is not None else url
        replica_env: Callable[[int], dict[str, str]] = lambda i: env  # noqa: E731
        if topology.standby:
            standby = PostgresServer.start_standby(pg)
            standby.wait_replayed(pg, timeout=60)
            read_env = {**env, "CE_DATABASE_READ_URL": _on_port(url, standby.port)}
            replica_env = lambda i: read_env if i % 2 else env  # noqa: E731
        figures["set-up"] = (
            f"{shape.replicas} replicas x {shape.workers} workers = {shape.replicas * shape.workers} "
            f"workers (`serve --workers {shape.workers}`, pool {settings.db_pool_size} + overflow "
            f"{settings.db_pool_overflow}, LISTEN {'on' if settings.db_listen else 'off'}, poll every "
            f"{POLL_INTERVAL} s), "
            + (f"through PgBouncer (pool {BOUNCER_POOL})" if bouncer else "connected to PostgreSQL directly")
            + (
                f"; the {shape.replicas // 2} odd-numbered replicas read from a hot standby "
                "(`pg_basebackup -R`, streaming; CE_DATABASE_READ_URL) and write to the primary"
                if standby
                else ""
            )
            + f"; catalog: {imported}"
        )
        monitor = Monitor(pg.url, database, t0, bouncer_admin=bouncer.admin_url if bouncer else None)
        with monitor:
            # ------------------------------------------------------------------ start-up
            mark("launch")
            servers, errors = start_fleet(pool, workdir, service_url, replica_env, shape)
            mark("all ready")
            report.failures += [prefix + e for e in errors]
            want = shape.workers
            deadline = t0 + mark["launch"] + shape.ready_timeout
            while time.monotonic() < deadline and any(started_workers(s) < want for s in servers):
                time.sleep(0.1)
            mark("all workers")
            started = sum(min(started_workers(s), want) for s in servers)
            figures["start-up"] = (
                f"{len(servers)}/{shape.replicas} replicas answered /readyz 200 within "
                f"{mark['all ready'] - mark['launch']:.1f} s of the launch, "
                f"{started}/{shape.replicas * want} workers started within "
                f"{mark['all workers'] - mark['launch']:.1f} s"
            )
            report.check(
                started == shape.replicas * want,
                f"{prefix}{shape.replicas * want - started} workers did not start within "
                f"{shape.ready_timeout:.0f} s",
            )
            if not servers:
                return

            # ------------------------------------------------------------------ measured phase
            traffic = Traffic([s.url for s in servers], secret, public_ids, owned_ids)
            ledger = traffic.ledger
            rnd = random.Random(13)
            cold, owned = traffic.cold_jobs(rnd, shape.new_orgs), traffic.owned_jobs(rnd)
            xacts: dict[str, int] = {}
            fleet = Fleet(
                servers,
                traffic,
                bouncer,
                lambda i: _launch(
                    pool, workdir / f"replica-{i:02d}-again", service_url, replica_env(i), shape
                ),
                shape.workers,
                standby=standby,
                primary=pg,
                xacts=monitor.xacts,
            )
            records: list[Record] = []
            propagations: dict[str, Propagation] = {}

            async def measured() -> None:
                stop = asyncio.Event()
                timeout = httpx.Timeout(CLIENT_TIMEOUT)
                # open-loop writes: enough connections that a slow service shows as slow answers, never
                # as the drill's own pool running dry (httpx.PoolTimeout) and counted against the service
                kept = httpx.Limits(max_connections=512, max_keepalive_connections=16)
                fresh = httpx.Limits(max_connections=shape.concurrency, max_keepalive_connections=0)
                # the steady reads and the propagation polls are open-loop too: their own clients, with
                # connections to spare (a shared, dry pool showed as PoolTimeout on a loaded machine)
                spare = httpx.Limits(max_connections=512, max_keepalive_connections=0)
                async with (
                    httpx.AsyncClient(timeout=timeout, limits=kept) as writes,
                    httpx.AsyncClient(timeout=timeout, limits=fresh) as bursts,
                    httpx.AsyncClient(timeout=timeout, limits=spare) as reads,
                    httpx.AsyncClient(timeout=timeout, limits=spare) as polls,
                ):
                    writer = asyncio.create_task(traffic.write_forever(writes, stop, seed=7))
                    reader = asyncio.create_task(traffic.read_forever(reads, stop, seed=11))
                    mark("bursts")
                    xacts["bursts"] = await asyncio.to_thread(monitor.xacts)
                    xacts["standby"] = await asyncio.to_thread(_standby_xacts, standby, database)
                    mark.at["cold seconds"] = await traffic.burst(
                        bursts, "cold burst", cold, shape.concurrency
                    )
                    mark.at["owned seconds"] = await traffic.burst(
                        bursts, "owned burst", owned, shape.concurrency
                    )
                    xacts["bursts end"] = await asyncio.to_thread(monitor.xacts)
                    mark("bursts end")
                    await asyncio.sleep(1.0)  # writes alone for a moment
                    propagations["after the bursts"] = await traffic.propagation(writes, polls)
                    for make in topology.faults:
                        fault = make()
                        record = await asyncio.to_thread(fault.inject, fleet)
                        records.append(record)
                        undo = getattr(fault, "undo", None)  # a fault that holds: timed while it holds
                        if undo is not None:
                            propagations[f"while {fault.name.split(' and ')[0]}"] = await traffic.propagation(
                                writes, polls
                            )
                            await asyncio.to_thread(undo, fleet, record)
                        record.figures["quiet after"] = f"{await _quiet(traffic, record.undone):.1f} s"
                        propagations[f"after {fault.name}"] = await traffic.propagation(writes, polls)
                    mark("propagated")
                    stop.set()
                    await asyncio.gather(writer, reader)
                    mark("writes end")

            asyncio.run(measured())

            # ------------------------------------------------------------------ idle window
            time.sleep(shape.settle)
            mark("idle")
            xacts["idle"] = monitor.xacts()
            xacts["standby idle"] = _standby_xacts(standby, database)
            idle_began = time.monotonic()
            time.sleep(shape.idle / 2)
            rss: dict[str, list[float]] = {"workers": [], "supervisors": []}
            workers_found = 0
            for server in servers:
                pids = worker_pids(server)
                workers_found += len(pids)
                rss["workers"] += [v for pid in pids if (v := rss_mib(pid)) is not None]
                if (v := rss_mib(server.process.pid)) is not None:
                    rss["supervisors"].append(v)
            available = _meminfo("MemAvailable")
            time.sleep(max(0.0, shape.idle - (time.monotonic() - idle_began)))
            xacts["idle end"] = monitor.xacts()
            xacts["standby idle end"] = _standby_xacts(standby, database)
            standby_backends = _standby_backends(standby, database)
            idle_seconds = time.monotonic() - idle_began
            mark("idle end")
        # ---------------------------------------------------------------------- figures
        answers = traffic.answers
        cold_answers, owned_answers, writes, reads = (
            [a for a in answers if a.phase == p] for p in ("cold burst", "owned burst", "writes", "reads")
        )
        write_span = mark["writes end"] - mark["bursts"]
        new_orgs = f"{shape.new_orgs} new orgs x {shape.replicas} replicas, {shape.concurrency} in flight"
        figures["cold burst"] = _burst(
            cold_answers, f"first requests ({new_orgs}, a new connection each)", mark["cold seconds"]
        )
        owned_orgs = f"{ORGS} orgs with {PER_ORG} Customized images each x {shape.replicas} replicas"
        figures["owned-orgs burst"] = _burst(owned_answers, f"requests ({owned_orgs})", mark["owned seconds"])
        figures["writes"] = (
            f"{len(writes)} ({sum(a.kind == 'create' for a in writes)} creates, "
            f"{sum(a.kind == 'delete' for a in writes)} deletes) over {write_span:.1f} s = "
            f"{len(writes) / write_span:.1f}/s (target {WRITE_RATE:.0f}/s), over every replica in service; "
            f"{_ms([a.latency for a in writes])}"
        )
        figures["steady reads"] = (
            f"{len(reads)} over {write_span:.1f} s (target {READ_RATE:.0f}/s), a new connection each; "
            f"{_ms([a.latency for a in reads])}"
        )
        excused, other = judge(records, answers)
        for record in records:
            figures[f"fault: {record.name}"] = "; ".join(f"{k} {v}" for k, v in record.figures.items()) + (
                f"; last excused answer ended {record.recovered:.2f} s after it was undone"
                if record.recovered is not None
                else "; no answer needed excusing"
            )
        for stage, propagation in propagations.items():
            figures[f"propagation of an admin write, {stage}"] = _propagation(propagation, len(servers))
        phases = {
            "start-up": monitor.between(mark["launch"], mark["all workers"]),
            "bursts": monitor.between(mark["bursts"], mark["bursts end"]),
            "writes, faults, propagation": monitor.between(mark["bursts end"], mark["writes end"]),
            "idle": monitor.between(mark["idle"], mark["idle end"]),
        }
        everything = monitor.samples
        n = shape.replicas * shape.workers
        figures["connection budget"] = _budget(settings, n, bouncer is not None)
        figures["peak server connections"] = f"{_peak(everything)}; by phase: " + "; ".join(
            f"{k} {_peak(v)}" for k, v in phases.items()
        )
        idle = phases["idle"]
        figures["steady server connections (idle)"] = (
            f"median {median([s.total for s in idle]):.0f}, max {max((s.total for s in idle), default=0)} "
            f"(the fleet's: median {median([s.fleet for s in idle]):.0f}; the monitor's own: 1) over "
            f"{idle_seconds:.0f} s"
        )
        if bouncer is not None:
            figures["PgBouncer's pools (SHOW POOLS)"] = _pools(monitor, mark)
        gaps = [b.at - a.at for a, b in itertools.pairwise(everything)]
        figures["monitor"] = (
            f"{len(everything)} samples (every {median(gaps) * 1000:.0f} ms, longest gap "
            f"{max(gaps, default=0) * 1000:.0f} ms), {monitor.probes} connections opened (one every "
            f"{PROBE_EVERY} s, in {_ms(monitor.connect_times)}); refused: {len(monitor.refused)}, "
            f"other connection failures: {len(monitor.failed)}, failed samples: {len(monitor.errors)}"
        )
        figures["answers by status"] = _by_status(answers)
        figures["non-2xx answers excused by a fault, by cause"] = excused or "none"
        figures["other non-2xx or wrong answers, by cause"] = other or "none"
        w, s = rss["workers"], rss["supervisors"]
        figures["RSS per worker (idle, after the bursts)"] = (
            f"median {median(w):.1f} MiB, max {max(w, default=0):.1f} MiB over {len(w)} workers "
            f"(each replica's supervisor: median {median(s):.1f} MiB); the fleet's total "
            f"{(sum(w) + sum(s)) / 1024:.1f} GiB, the machine's MemAvailable then {available / 1024:.0f} MiB"
        )
        polling_rate = (xacts["idle end"] - xacts["idle"]) / idle_seconds
        burst_seconds = mark["bursts end"] - mark["bursts"]
        figures["polling cost on the primary"] = (
            f"{polling_rate:.0f} transactions/s ({polling_rate / max(1, workers_found):.2f} per worker; "
            f"xact_commit + xact_rollback of the service's database over {idle_seconds:.0f} s idle; "
            f"a poll every {POLL_INTERVAL} s is one, the poll's own read; a connection idle over "
            f"{db.PING_AFTER_IDLE:.0f} s is pinged first); "
            f"during the bursts: {(xacts['bursts end'] - xacts['bursts']) / burst_seconds:.0f}/s over "
            f"{burst_seconds:.1f} s"
        )
        if standby is not None:
            readers = max(1, sum(1 for i in range(len(servers)) if i % 2) * shape.workers)
            busy = (xacts["standby idle"] - xacts["standby"]) / (mark["idle"] - mark["bursts"])
            quiet = (xacts["standby idle end"] - xacts["standby idle"]) / idle_seconds
            figures["reads on the standby"] = (
                f"{busy:.0f} transactions/s ({busy / readers:.2f} per worker of the {readers} that read "
                f"from it) from the bursts to the idle window (changes and org loads), {quiet:.0f}/s idle: "
                "each poll first asks the primary for its revision (one indexed row, counted above) and "
                "reads the standby only when there is something new; the standby's client backends on "
                f"the service's database at the end of the idle window: {standby_backends}"
            )

        # ---------------------------------------------------------------------- checks
        report.check(not other, f"{prefix}{sum(other.values())} answers no fault excuses: {other}")
        peak = max((x.total for x in everything), default=0)
        report.check(
            peak < MAX_CONNECTIONS,
            f"{prefix}peak of {peak} client backends, at or above max_connections {MAX_CONNECTIONS}",
        )
        if bouncer is not None:
            report.check(
                peak <= BOUNCER_POOL + DRILL_OWN,
                f"{prefix}peak of {peak} client backends, over PgBouncer's pool {BOUNCER_POOL} + the "
                f"drill's {DRILL_OWN}",
            )
        for stage, propagation in propagations.items():
            missing = [t for t in propagation.targets if t not in propagation.seconds]
            report.check(
                not propagation.stale and not missing and propagation.error is None,
                f"{prefix}{stage}: {propagation.stale} answers to requests sent more than "
                f"{PROPAGATION_LIMIT} s after the write's 201 did not list it; never listed by "
                f"{len(missing)} replicas {missing[:3]}; {propagation.error or ''}",
            )
        for record in records:
            report.failures += [f"{prefix}{record.name}: {f}" for f in record.failures]
        report.check(
            not monitor.refused,
            f"{prefix}the server refused the monitor {len(monitor.refused)} times: {monitor.refused[:3]}",
        )
        report.check(
            not monitor.failed and not monitor.errors,
            f"{prefix}the monitor could not connect {len(monitor.failed)} times (within {CONNECT_TIMEOUT} "
            f"s) and {len(monitor.errors)} samples failed: {(monitor.failed + monitor.errors)[:3]}",
        )
        report.check(workers_found == n, f"{prefix}{workers_found} worker processes at the end, expected {n}")
    finally:
        left = stop_fleet(pool, servers)
        pool.shutdown()
        figures["processes left after stopping"] = len(left)
        report.check(not left, f"{prefix}{len(left)} processes outlived their server's stop: {left[:5]}")
        try:
            if url is not None and ledger is not None:
                verified = Report()
                verify_ledger(url, ledger, verified)
                figures.update(verified.figures)
                report.failures += [prefix + f for f in verified.failures]
        finally:
            if bouncer is not None:
                bouncer.destroy()
            if standby is not None:
                standby.destroy()
        report.figures.update({prefix + k: v for k, v in figures.items()})
        if report.failures and servers:
            report.details += [
                f"Server log of the first replica ({topology.label}, tail):",
                "",
                "```",
                servers[0].log()[-2000:],
                "```",
            ]


async def _quiet(traffic: Traffic, since: float) -> float:
    """Wait (at most ``RECOVERY_LIMIT`` s) until the last ``QUIET`` s worth of steady reads sent after
    ``since`` answered 2xx; the seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < RECOVERY_LIMIT:
        now = time.monotonic()
        done = sorted(
            (a for a in traffic.answers if a.phase == "reads" and a.at >= since), key=lambda a: a.at
        )
        last = done[-int(QUIET * READ_RATE) :]
        if (
            now - since >= QUIET
            and len(last) >= int(QUIET * READ_RATE)
            and all(a.cause is None for a in last)
        ):
            break
        await asyncio.sleep(0.1)
    return time.monotonic() - began


def _propagation(propagation: Propagation, replicas: int) -> str:
    seconds = sorted(propagation.seconds.values())
    answered = sorted(propagation.answered.values())
    return (
        f"p50 {median(seconds):.2f} s, max {max(seconds, default=float('nan')):.2f} s over "
        f"{len(seconds)}/{replicas} replicas, from the write's 201 (the write itself took "
        f"{propagation.write_latency * 1000:.0f} ms) to the sending of the first of {PROPAGATION_HITS} "
        f"requests in a row whose answers list it (to their answer: p50 {median(answered):.2f} s, max "
        f"{max(answered, default=float('nan')):.2f} s); {propagation.polls} polls, latency "
        f"{_ms(propagation.gaps)}; listed then missed again: {propagation.relapses}; missed by a request "
        f"sent over {PROPAGATION_LIMIT} s after the 201: {propagation.stale}"
        + (f"; {propagation.error}" if propagation.error else "")
    )


def _budget(settings: Settings, workers: int, pooled: bool) -> str:
    at_rest = settings.db_pool_size + settings.db_listen
    at_most = settings.db_pool_size + settings.db_pool_overflow + settings.db_listen
    if not pooled:
        return (
            f"{workers} workers: {workers * at_rest} connections at rest, at most {workers * at_most} "
            f"(+{DRILL_OWN}: the drill's), of max_connections {MAX_CONNECTIONS}"
        )
    return (
        f"{workers} workers: {workers * at_rest} client connections to PgBouncer at rest, at most "
        f"{workers * at_most}; PostgreSQL sees at most PgBouncer's pool, {BOUNCER_POOL} "
        f"(+{DRILL_OWN}: the drill's), of max_connections {MAX_CONNECTIONS}"
    )


def _pools(monitor: Monitor, mark: Marks) -> str:
    pools = monitor.pools
    if not pools:
        return f"no samples ({len(monitor.pool_errors)} failed)"
    clients = max(pools, key=lambda p: p.cl_active + p.cl_waiting)
    idle = [p for p in pools if mark["idle"] <= p.at < mark["idle end"]]
    return (
        f"{len(pools)} samples; peak clients {clients.cl_active + clients.cl_waiting} "
        f"({clients.cl_waiting} waiting, at {clients.at:.1f} s); most waiting "
        f"{max(p.cl_waiting for p in pools)}, longest wait {max(p.maxwait for p in pools)} s; peak server "
        f"connections in use {max(p.sv_active + p.sv_used for p in pools)}, open "
        f"{max(p.sv_active + p.sv_idle + p.sv_used for p in pools)}; idle: clients median "
        f"{median([p.cl_active for p in idle]):.0f}, server connections median "
        f"{median([p.sv_active + p.sv_idle + p.sv_used for p in idle]):.0f}; SHOW POOLS failed "
        f"{len(monitor.pool_errors)} times (PgBouncer down)"
    )


def _on_port(url: str, port: int) -> str:
    """``url`` with another server port (the standby's: same database, same role)."""
    return make_url(url).set(port=port).render_as_string(hide_password=False)


def _standby_xacts(standby: PostgresServer | None, database: str) -> int:
    """Transactions of the service's database on the standby so far (0 without one): its readers' polls
    and org loads."""
    if standby is None:
        return 0
    rows = standby.query(
        f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{database}'"
    )
    return int(str(rows[0][0])) if rows else 0


def _standby_backends(standby: PostgresServer | None, database: str) -> int:
    if standby is None:
        return 0
    rows = standby.query(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        f"AND datname = '{database}'"
    )
    return int(str(rows[0][0])) if rows else 0


def _meminfo(key: str) -> float:
    """/proc/meminfo's ``key``, in KiB (0 if unknown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return float(line.split()[1])
    return 0.0
