"""Fleet: many replicas of the service on one stock PostgreSQL (``max_connections = 100``).

``R`` replicas of ``cluster-engine serve --workers W`` (full: 25 x 2 = 50 workers; short: 8 x 2) on
loopback ports, all started at once, share one fresh, durable PostgreSQL 15 that keeps its stock
``max_connections = 100``, migrated with ``cluster-engine db upgrade`` and seeded with a small catalog
(40 Public images, 10 Customized for each of 30 orgs). The workers run with the defaults of the
connection budget (``CE_DB_POOL_SIZE`` 1, ``CE_DB_POOL_OVERFLOW`` 1, ``CE_DB_LISTEN`` off) and poll every
0.25 s. Then, with writes at about 10/s throughout (Customized creates and deletes by ``images:write``
tokens of the seeded orgs, Public ones by an ``images:admin`` token, over every replica):

1. a cold burst: the first request of each of 200 new orgs (fresh tokens) at every replica (full: 5,000
   requests), a new connection each so that they spread over the workers, at bounded concurrency; then
   the same from the 30 orgs that own Customized images. Every answer must be a 200 whose images are
   Public or the caller's own, with every seeded image the caller may see;
2. one admin write (a new Public image), after which every replica is polled (a new connection each
   time, so both workers answer) until it lists the image in ``PROPAGATION_HITS`` answers in a row:
   the propagation time of a replica runs from the write's 201 to the first of those answers;
3. the writes stop; after a settling pause the fleet sits idle for a window in which the steady
   connections, each worker's RSS, and the transactions the fleet's polling costs the primary
   (``pg_stat_database.xact_commit + xact_rollback`` of the service's database: its delta over the
   window, divided by the window's length) are measured.

A monitor in a process of its own, on the ``postgres`` database, samples ``SELECT count(*) FROM
pg_stat_activity WHERE backend_type = 'client backend'`` every 50 ms from the moment before the fleet
starts until the idle window ends, and every 0.5 s opens a new connection besides (the drill itself must
always be able to connect: the failure that started this was a fleet that took every connection slot),
recording how long each connection took to open.

Fails on: any answer other than 200/201/204 (each reported by status and body), a list answer showing
another org's image or missing a seeded one, a peak of 100 or more client backends, a replica that did
not list the admin's write within 1 s (or at all), a monitor connection refused by the server or not
open within 10 s, a failed sample, a worker that did not start, an acknowledged write lost or
half-written, or a process left after the drill.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg

from cluster_engine.auth import SCOPE_ADMIN, mint_token
from cluster_engine.config import load_settings
from cluster_engine.pgserver import PostgresServer
from cluster_engine.pids import pid_alive
from cluster_engine.testing import LiveServer

from .common import (
    DRILL_PREFIX,
    IDCS,
    SCOPE_WRITE,
    Ledger,
    Report,
    create_body,
    median,
    org,
    percentile,
    rss_mib,
    seed_catalog,
    verify_ledger,
    worker_pids,
)

NAME = "fleet"
TITLE = "Fleet: 25 replicas x 2 workers on one stock PostgreSQL (max_connections 100)"

MAX_CONNECTIONS = 100  # PostgreSQL's stock value
POLL_INTERVAL = 0.25  # the service's default CE_POLL_INTERVAL (LiveServer's is 0.05)
PUBLIC, ORGS, PER_ORG = 40, 30, 10  # the seeded catalog: 340 images
NEW_ORGS = 200  # orgs of the cold burst, each asking every replica
WRITE_RATE = 10.0  # writes/s during the measured phase
SAMPLE_EVERY = 0.05  # s between connection counts
PROBE_EVERY = 0.5  # s between new monitoring connections
PROPAGATION_LIMIT = 1.0  # s: CE_FRESHNESS_BOUND's default, the README's promise
PROPAGATION_POLL = 0.05  # s between polls of one replica
PROPAGATION_HITS = 4  # answers in a row that list the image
PROPAGATION_TIMEOUT = 10.0
PROPAGATION_IDC = "fleet-propagation"  # the write's idc: polls filter on it, so answers stay small
CLIENT_TIMEOUT = 30.0  # a slow answer shows as its real length, not as a client timeout
MONITOR_APP = "ce-fleet-drill-monitor"
CONNECT_TIMEOUT = 10  # s for the monitor's connections; a slow one is a figure, a refused one a failure
ADMIN_ORG = uuid.uuid5(uuid.NAMESPACE_URL, "cluster-engine-drill-fleet-admin")
COUNT_QUERY = (
    "SELECT count(*), count(*) FILTER (WHERE datname = %s) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend'"
)
XACT_QUERY = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s"


@dataclass(frozen=True)
class Shape:
    replicas: int
    workers: int
    concurrency: int  # connections in flight during the bursts
    ready_timeout: float  # s for the whole fleet to start
    settle: float  # s between the end of the writes and the idle window
    idle: float  # s of the idle window


FULL = Shape(replicas=25, workers=2, concurrency=64, ready_timeout=300.0, settle=3.0, idle=20.0)
SHORT = Shape(replicas=8, workers=2, concurrency=32, ready_timeout=120.0, settle=2.0, idle=8.0)


# ------------------------------------------------------------------------------------------ monitor


@dataclass
class Sample:
    at: float  # s since the drill's clock started
    total: int  # every client backend, the monitor's own included
    fleet: int  # client backends on the service's database


REFUSALS = ("too many clients", "remaining connection slots", "no more connections allowed")


def _monitor_main(url: str, database: str, t0: float, stop: Any, out: Any) -> None:
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
        stop.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - began)))
    if conn is not None:
        conn.close()
    out.send(
        {
            "samples": samples,
            "refused": refused,
            "failed": failed,
            "errors": errors,
            "connect_times": connect_times,
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

    def __post_init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_monitor_main,
            args=(self.url, self.database, self.t0, self._stop, send),
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


# ------------------------------------------------------------------------------------------ answers


@dataclass
class Answer:
    phase: str  # cold burst | owned burst | writes | propagation
    kind: str  # list | create | delete
    status: int  # 0: no HTTP answer
    latency: float  # s
    cause: str | None = None  # for an unexpected status: the status and the body
    problem: str | None = None  # for a 200 list: what is wrong with its images


EXPECTED = {"list": 200, "create": 201, "delete": 204}


def cause_of(kind: str, response: httpx.Response) -> str | None:
    if response.status_code == EXPECTED[kind]:
        return None
    return f"{kind} {response.status_code}: {response.text[:160]}"


def list_problem(body: bytes, caller: str, expected: set[str]) -> str | None:
    """None when every image listed is Public or the caller's and every ``expected`` id is there."""
    try:
        items = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "body is not JSON"
    if not isinstance(items, list):
        return "body is not an array"
    for item in items:
        if not isinstance(item, dict):
            return "an item is not an object"
        if item.get("type") != "Public" and item.get("orgId") != caller:
            return f"shows {item.get('type')} image of another org ({item.get('orgId')})"
    missing = expected - {item.get("id") for item in items}
    return f"{len(missing)} seeded images missing" if missing else None


@dataclass
class Traffic:
    """What the drill sends, and every answer it got."""

    targets: Sequence[str]
    secret: str
    public_ids: set[str]
    owned_ids: dict[int, set[str]]  # seeded org index -> its Customized image ids
    answers: list[Answer] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    write_times: list[float] = field(default_factory=list)  # monotonic send times of the writes

    def __post_init__(self) -> None:
        self.admin = mint_token(self.secret, ADMIN_ORG, scopes=[SCOPE_ADMIN], ttl=24 * 3600)
        self.writers = [
            mint_token(self.secret, org(i), scopes=[SCOPE_WRITE], ttl=24 * 3600) for i in range(ORGS)
        ]

    async def send(self, phase: str, kind: str, request: Any) -> tuple[httpx.Response | None, Answer]:
        began = time.monotonic()
        try:
            response: httpx.Response = await request
        except httpx.HTTPError as exc:
            cause = f"{kind}: no answer ({type(exc).__name__}: {exc})"[:200]
            answer = Answer(phase, kind, 0, time.monotonic() - began, cause)
            self.answers.append(answer)
            return None, answer
        answer = Answer(phase, kind, response.status_code, time.monotonic() - began, cause_of(kind, response))
        self.answers.append(answer)
        return response, answer

    # ------------------------------------------------------------------------------------ bursts

    async def burst(
        self, client: httpx.AsyncClient, phase: str, jobs: list[tuple[str, str, str, set[str]]], width: int
    ) -> float:
        """GET /v1/images for each (target, token, caller org, expected ids), ``width`` at a time."""
        began = time.monotonic()
        queue = list(reversed(jobs))

        async def worker() -> None:
            while queue:
                target, token, caller, expected = queue.pop()
                response, answer = await self.send(
                    phase,
                    "list",
                    client.get(f"{target}/v1/images", headers={"Authorization": f"Bearer {token}"}),
                )
                if response is not None and response.status_code == 200:
                    answer.problem = list_problem(response.content, caller, expected)

        await asyncio.gather(*(worker() for _ in range(width)))
        return time.monotonic() - began

    def cold_jobs(self, rnd: random.Random) -> list[tuple[str, str, str, set[str]]]:
        orgs = [uuid.uuid4() for _ in range(NEW_ORGS)]
        jobs = [
            (target, mint_token(self.secret, who), str(who), self.public_ids)
            for who in orgs
            for target in self.targets
        ]
        rnd.shuffle(jobs)
        return jobs

    def owned_jobs(self, rnd: random.Random) -> list[tuple[str, str, str, set[str]]]:
        jobs = [
            (target, mint_token(self.secret, org(i)), str(org(i)), self.public_ids | self.owned_ids[i])
            for i in range(ORGS)
            for target in self.targets
        ]
        rnd.shuffle(jobs)
        return jobs

    # ------------------------------------------------------------------------------------ writes

    async def write_forever(self, client: httpx.AsyncClient, stop: asyncio.Event, seed: int) -> None:
        """Paced writes at ``WRITE_RATE``/s over every replica until ``stop``: creates (a fifth of them
        Public, by the admin), and deletes of earlier creates (30% of writes once there are some)."""
        rnd = random.Random(seed)
        pending: set[asyncio.Task[None]] = set()
        live: list[tuple[str, str]] = []  # (image id, token that may delete it)
        next_at = time.monotonic()
        sent = 0
        while not stop.is_set():
            now = time.monotonic()
            if next_at > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), next_at - now)
                continue
            next_at = max(next_at + 1 / WRITE_RATE, now - 1.0)  # no catch-up bursts after a stall
            target = self.targets[sent % len(self.targets)]
            sent += 1
            self.write_times.append(now)
            if live and rnd.random() < 0.3:
                image_id, token = live.pop(rnd.randrange(len(live)))
                coro = self._delete(client, target, image_id, token)
            else:
                coro = self._create(client, target, rnd, live)
            task = asyncio.create_task(coro)
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*list(pending))

    async def _create(
        self, client: httpx.AsyncClient, target: str, rnd: random.Random, live: list[tuple[str, str]]
    ) -> None:
        name = f"{DRILL_PREFIX}{uuid.UUID(int=rnd.getrandbits(128)).hex[:16]}"
        if rnd.random() < 0.2:
            body = {**create_body(ADMIN_ORG, name=name, idc=rnd.choice(IDCS)), "type": "Public"}
            token = self.admin
        else:
            who = rnd.randrange(ORGS)
            body = create_body(org(who), name=name, idc=rnd.choice(IDCS))
            token = self.writers[who]
        response, _ = await self.send(
            "writes",
            "create",
            client.post(f"{target}/v1/images", json=body, headers={"Authorization": f"Bearer {token}"}),
        )
        if response is not None and response.status_code == 201:
            image = response.json()
            self.ledger.created[image["id"]] = image
            live.append((image["id"], token))
        else:
            self.ledger.uncertain_names.add(name)

    async def _delete(self, client: httpx.AsyncClient, target: str, image_id: str, token: str) -> None:
        response, _ = await self.send(
            "writes",
            "delete",
            client.delete(f"{target}/v1/images/{image_id}", headers={"Authorization": f"Bearer {token}"}),
        )
        if response is not None and response.status_code == 204:
            self.ledger.deleted.add(image_id)
        else:
            self.ledger.uncertain_deletes.add(image_id)

    # ------------------------------------------------------------------------------- propagation

    async def propagation(self, writer: httpx.AsyncClient, fresh: httpx.AsyncClient) -> Propagation:
        """One admin write of a Public image, then every replica polled until it lists the image."""
        result = Propagation()
        name = f"{DRILL_PREFIX}fleet-propagation-{uuid.uuid4().hex[:12]}"
        body = {**create_body(ADMIN_ORG, name=name, idc=PROPAGATION_IDC), "type": "Public"}
        sent = time.monotonic()
        response, answer = await self.send(
            "propagation",
            "create",
            writer.post(
                f"{self.targets[0]}/v1/images", json=body, headers={"Authorization": f"Bearer {self.admin}"}
            ),
        )
        acked = time.monotonic()
        result.write_latency = acked - sent
        if response is None or response.status_code != 201:
            self.ledger.uncertain_names.add(name)
            result.error = answer.cause or "the write failed"
            return result
        image = response.json()
        self.ledger.created[image["id"]] = image
        needle = image["id"].encode()
        reader = mint_token(self.secret, uuid.uuid4())
        headers = {"Authorization": f"Bearer {reader}"}

        async def watch(target: str) -> None:
            first_hit: float | None = None
            hits = 0
            while time.monotonic() - acked < PROPAGATION_TIMEOUT:
                began = time.monotonic()
                polled, _ = await self.send(
                    "propagation",
                    "list",
                    fresh.get(f"{target}/v1/images", params={"idc": PROPAGATION_IDC}, headers=headers),
                )
                got = time.monotonic()
                result.polls += 1
                if polled is not None and polled.status_code == 200 and needle in polled.content:
                    if first_hit is None:
                        first_hit = got
                    hits += 1
                    if hits >= PROPAGATION_HITS:
                        result.seconds[target] = first_hit - acked
                        return
                else:
                    if first_hit is not None:
                        result.relapses += 1  # listed, then not: one worker had it, the other not yet
                    first_hit, hits = None, 0
                result.gaps.append(got - began)
                await asyncio.sleep(max(0.0, PROPAGATION_POLL - (time.monotonic() - began)))

        await asyncio.gather(*(watch(target) for target in self.targets))
        return result


@dataclass
class Propagation:
    write_latency: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)  # target -> s from the 201 to being listed
    polls: int = 0
    relapses: int = 0
    gaps: list[float] = field(default_factory=list)  # each poll's latency
    error: str | None = None


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


def start_fleet(
    pool: concurrent.futures.ThreadPoolExecutor, workdir: Path, url: str, env: dict[str, str], shape: Shape
) -> tuple[list[LiveServer], list[str]]:
    """Every replica started at once (a thread of ``pool`` each starts one and waits for its /readyz); the
    servers that came up and what went wrong with the others. ``pool`` must outlive the servers: each
    server gets SIGTERM when the thread that started it ends (LiveServer sets PR_SET_PDEATHSIG, which
    follows the forking thread, not the process)."""
    futures = [
        pool.submit(
            LiveServer.start,
            workdir / f"replica-{i:02d}",
            database_url=url,
            args=["--workers", str(shape.workers)],
            env=env,
            timeout=shape.ready_timeout,
        )
        for i in range(shape.replicas)
    ]
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
    shape = SHORT if short else FULL
    report = Report()
    figures: dict[str, Any] = report.figures
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = time.monotonic() - t0

    secret = secrets.token_urlsafe(48)
    env = {"CE_JWT_SECRET": secret, "CE_POLL_INTERVAL": str(POLL_INTERVAL)}
    settings = load_settings({**os.environ, **env, "CE_DATABASE_URL": "postgresql://x/y"})
    pg = PostgresServer.start(durable=True, max_connections=MAX_CONNECTIONS)
    # the threads that start the servers live until the servers are stopped (see start_fleet)
    pool = concurrent.futures.ThreadPoolExecutor(shape.replicas, thread_name_prefix="replica")
    servers: list[LiveServer] = []
    ledger: Ledger | None = None  # the writes', once they begin
    url: str | None = None
    try:
        url = pg.create_database()
        database = url.rsplit("/", 1)[1]
        cli_env = {**os.environ, **env, "CE_DATABASE_URL": url, "CE_DATA_DIR": str(workdir / "cli")}
        _cli(cli_env, "db", "upgrade")
        catalog = seed_catalog(workdir / "catalog.json", public=PUBLIC, orgs=ORGS, per_org=PER_ORG)
        imported = _cli(cli_env, "catalog", "import", str(catalog))
        public_ids, owned_ids = _seeded(catalog)
        with psycopg.connect(pg.url, autocommit=True, connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            max_conn = conn.execute("SHOW max_connections").fetchone()
        figures["set-up"] = (
            f"{shape.replicas} replicas x {shape.workers} workers = {shape.replicas * shape.workers} "
            f"workers (`serve --workers {shape.workers}`, pool {settings.db_pool_size} + overflow "
            f"{settings.db_pool_overflow}, LISTEN {'on' if settings.db_listen else 'off'}, poll every "
            f"{POLL_INTERVAL} s); PostgreSQL {version[0] if version else '?'} (durable), max_connections "
            f"{max_conn[0] if max_conn else '?'}; catalog: {imported} ({PUBLIC} Public, {ORGS} orgs x "
            f"{PER_ORG} Customized)"
        )

        monitor = Monitor(pg.url, database, t0)
        with monitor:
            # ------------------------------------------------------------------ start-up
            mark("launch")
            servers, errors = start_fleet(pool, workdir, url, env, shape)
            mark("all ready")
            report.failures += errors
            want = shape.workers
            deadline = t0 + marks["launch"] + shape.ready_timeout
            while time.monotonic() < deadline and any(started_workers(s) < want for s in servers):
                time.sleep(0.1)
            mark("all workers")
            started = sum(min(started_workers(s), want) for s in servers)
            figures["start-up"] = (
                f"{len(servers)}/{shape.replicas} replicas answered /readyz 200 within "
                f"{marks['all ready'] - marks['launch']:.1f} s of the launch, "
                f"{started}/{shape.replicas * want} workers started within "
                f"{marks['all workers'] - marks['launch']:.1f} s"
            )
            report.check(
                started == shape.replicas * want,
                f"{shape.replicas * want - started} workers did not start within {shape.ready_timeout:.0f} s",
            )
            if not servers:
                return report

            # ------------------------------------------------------------------ measured phase
            traffic = Traffic([s.url for s in servers], secret, public_ids, owned_ids)
            ledger = traffic.ledger
            rnd = random.Random(13)
            cold, owned = traffic.cold_jobs(rnd), traffic.owned_jobs(rnd)
            xacts: dict[str, int] = {}

            async def measured() -> Propagation:
                stop = asyncio.Event()
                timeout = httpx.Timeout(CLIENT_TIMEOUT)
                kept = httpx.Limits(max_connections=16, max_keepalive_connections=16)
                fresh = httpx.Limits(max_connections=shape.concurrency, max_keepalive_connections=0)
                async with (
                    httpx.AsyncClient(timeout=timeout, limits=kept) as writes,
                    httpx.AsyncClient(timeout=timeout, limits=fresh) as bursts,
                ):
                    writer = asyncio.create_task(traffic.write_forever(writes, stop, seed=7))
                    mark("bursts")
                    xacts["bursts"] = await asyncio.to_thread(monitor.xacts)
                    marks["cold seconds"] = await traffic.burst(bursts, "cold burst", cold, shape.concurrency)
                    marks["owned seconds"] = await traffic.burst(
                        bursts, "owned burst", owned, shape.concurrency
                    )
                    xacts["bursts end"] = await asyncio.to_thread(monitor.xacts)
                    mark("bursts end")
                    await asyncio.sleep(1.0)  # writes alone for a moment
                    result = await traffic.propagation(writes, bursts)
                    mark("propagated")
                    stop.set()
                    await writer
                    mark("writes end")
                return result

            propagation = asyncio.run(measured())

            # ------------------------------------------------------------------ idle window
            time.sleep(shape.settle)
            mark("idle")
            xacts["idle"] = monitor.xacts()
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
            time.sleep(max(0.0, shape.idle - (time.monotonic() - idle_began)))
            xacts["idle end"] = monitor.xacts()
            idle_seconds = time.monotonic() - idle_began
            mark("idle end")
        # ---------------------------------------------------------------------- figures
        answers = traffic.answers
        writes = [a for a in answers if a.phase == "writes"]
        write_span = marks["writes end"] - marks["bursts"]
        cold_answers = [a for a in answers if a.phase == "cold burst"]
        owned_answers = [a for a in answers if a.phase == "owned burst"]
        figures["cold burst"] = (
            f"{len(cold_answers)} first requests ({NEW_ORGS} new orgs x {len(servers)} replicas, "
            f"{shape.concurrency} in flight, a new connection each) in {marks['cold seconds']:.1f} s "
            f"({len(cold_answers) / marks['cold seconds']:.0f} req/s); "
            f"{_ms([a.latency for a in cold_answers])}"
        )
        figures["owned-orgs burst"] = (
            f"{len(owned_answers)} requests ({ORGS} orgs with {PER_ORG} Customized images each x "
            f"{len(servers)} replicas) in {marks['owned seconds']:.1f} s; "
            f"{_ms([a.latency for a in owned_answers])}"
        )
        burst_seconds = marks["bursts end"] - marks["bursts"]
        polling_rate = (xacts["idle end"] - xacts["idle"]) / idle_seconds
        burst_xacts = xacts["bursts end"] - xacts["bursts"]
        figures["writes"] = (
            f"{len(writes)} ({sum(a.kind == 'create' for a in writes)} creates, "
            f"{sum(a.kind == 'delete' for a in writes)} deletes) over {write_span:.1f} s = "
            f"{len(writes) / write_span:.1f}/s, over every replica; {_ms([a.latency for a in writes])}"
        )
        seconds = sorted(propagation.seconds.values())
        figures["propagation of an admin write"] = (
            f"p50 {median(seconds):.2f} s, max {max(seconds, default=float('nan')):.2f} s over "
            f"{len(seconds)}/{len(servers)} replicas, from the write's 201 (the write itself took "
            f"{propagation.write_latency * 1000:.0f} ms) to the first of {PROPAGATION_HITS} answers in a "
            f"row listing it; {propagation.polls} polls, latency {_ms(propagation.gaps)}; "
            f"listed then missed again: {propagation.relapses}"
            + (f"; {propagation.error}" if propagation.error else "")
        )
        phases = {
            "start-up": monitor.between(marks["launch"], marks["all workers"]),
            "bursts": monitor.between(marks["bursts"], marks["bursts end"]),
            "writes, propagation": monitor.between(marks["bursts end"], marks["writes end"]),
            "idle": monitor.between(marks["idle"], marks["idle end"]),
        }
        everything = monitor.samples
        per_worker = settings.db_pool_size + settings.db_pool_overflow + settings.db_listen
        at_rest = settings.db_pool_size + settings.db_listen
        n = shape.replicas * shape.workers
        figures["connection budget"] = (
            f"{n} workers: {n * at_rest} connections at rest, at most {n * per_worker} "
            f"(+1: the monitor's), of max_connections {MAX_CONNECTIONS}"
        )
        figures["peak server connections"] = f"{_peak(everything)}; by phase: " + "; ".join(
            f"{k} {_peak(v)}" for k, v in phases.items()
        )
        idle = phases["idle"]
        figures["steady server connections (idle)"] = (
            f"median {median([s.total for s in idle]):.0f}, max {max((s.total for s in idle), default=0)} "
            f"(the fleet's: median {median([s.fleet for s in idle]):.0f}; the monitor's own: 1) over "
            f"{idle_seconds:.0f} s"
        )
        gaps = [b.at - a.at for a, b in itertools.pairwise(everything)]
        figures["monitor"] = (
            f"{len(everything)} samples (every {median(gaps) * 1000:.0f} ms, longest gap "
            f"{max(gaps, default=0) * 1000:.0f} ms), {monitor.probes} connections opened (one every "
            f"{PROBE_EVERY} s, in {_ms(monitor.connect_times)}); refused: {len(monitor.refused)}, "
            f"other connection failures: {len(monitor.failed)}, failed samples: {len(monitor.errors)}"
        )
        causes: dict[str, int] = {}
        for a in answers:
            for why in (a.cause, a.problem and f"{a.phase} list 200: {a.problem}"):
                if why:
                    causes[why] = causes.get(why, 0) + 1
        figures["answers by status"] = _by_status(answers)
        figures["non-2xx answers by cause"] = {
            k: v for k, v in causes.items() if not k.startswith(("cold burst", "owned burst"))
        } or "none"
        problems = {k: v for k, v in causes.items() if k.startswith(("cold burst", "owned burst"))}
        figures["list answers with wrong images"] = problems or "none"
        w, s = rss["workers"], rss["supervisors"]
        figures["RSS per worker (idle, after the bursts)"] = (
            f"median {median(w):.1f} MiB, max {max(w, default=0):.1f} MiB over {len(w)} workers "
            f"(each replica's supervisor: median {median(s):.1f} MiB)"
        )
        figures["polling cost on the primary"] = (
            f"{polling_rate:.0f} transactions/s ({polling_rate / max(1, workers_found):.2f} per worker; "
            f"xact_commit + xact_rollback of the service's database over {idle_seconds:.0f} s idle; "
            f"a poll every {POLL_INTERVAL} s is two: the pool's pre-ping SELECT 1, in autocommit, and the "
            "poll's own read); "
            f"during the bursts and writes: {burst_xacts / burst_seconds:.0f}/s over {burst_seconds:.1f} s"
        )

        # ---------------------------------------------------------------------- checks
        bad = sum(causes.values())
        report.check(not causes, f"{bad} answers other than 200/201/204 or with wrong images: {causes}")
        peak = max((x.total for x in everything), default=0)
        report.check(
            peak < MAX_CONNECTIONS,
            f"peak of {peak} client backends, at or above max_connections {MAX_CONNECTIONS}",
        )
        late = {t: round(v, 2) for t, v in propagation.seconds.items() if v > PROPAGATION_LIMIT}
        missing = [t for t in traffic.targets if t not in propagation.seconds]
        report.check(
            not late and not missing and propagation.error is None,
            f"propagation over {PROPAGATION_LIMIT} s: {late}; never listed by {len(missing)} replicas "
            f"{missing[:3]}; {propagation.error or ''}",
        )
        report.check(
            not monitor.refused,
            f"the server refused the monitor {len(monitor.refused)} times: {monitor.refused[:3]}",
        )
        report.check(
            not monitor.failed and not monitor.errors,
            f"the monitor could not connect {len(monitor.failed)} times (within {CONNECT_TIMEOUT} s) and "
            f"{len(monitor.errors)} samples failed: {(monitor.failed + monitor.errors)[:3]}",
        )
        report.check(
            workers_found == shape.replicas * shape.workers,
            f"{workers_found} worker processes at the end, expected {shape.replicas * shape.workers}",
        )
    finally:
        left = stop_fleet(pool, servers)
        pool.shutdown()
        figures["processes left after stopping"] = len(left)
        report.check(not left, f"{len(left)} processes outlived their server's stop: {left[:5]}")
        try:
            if url is not None and ledger is not None:
                verify_ledger(url, ledger, report)
        finally:
            pg.destroy()
    figures["duration"] = f"{time.monotonic() - t0:.0f} s"
    report.details.append(_provenance())
    if report.failures and servers:
        report.details += [
            "Server log of the first replica (tail):",
            "",
            "```",
            servers[0].log()[-2000:],
            "```",
        ]
    return report
