"""Server crash: ``kill -9`` of one worker, and of the whole server, during concurrent writes, on SQLite and
on PostgreSQL; after each restart, every acknowledged write is still there and the database is sound.

For each store the service runs with 2 workers on a seeded catalog, under a paced load that is mostly
writes (creates, and deletes of earlier creates). Each kill cycle runs one phase of that load and, during
it, SIGKILLs one worker (granian is expected to respawn it; what happens instead is reported), then
SIGKILLs the server's whole process group and starts a new server on the same database (same JWT secret,
new port) that the load continues against. On PostgreSQL every second cycle (in the short run, its one
cycle) also SIGKILLs PostgreSQL itself together with the server (a host crash; the drill's PostgreSQL runs
with durable settings), and restarts it before the service. A last phase runs on the final server.

Requests that got no answer while a kill was in effect (from the kill until the service answered again)
are counted as cut by the kill, not as failures; every other answer must be within the contract (2xx, or
503 with its body). After the last phase the drill checks: each org's list as served equals what the
database holds; every acknowledged create is stored whole and every acknowledged delete is gone
(``verify_ledger``); SQLite's ``PRAGMA integrity_check`` and ``foreign_key_check``, or on PostgreSQL
``amcheck`` of every B-tree index (``bt_index_parent_check`` with ``heapallindexed``) and of every table's
heap (``verify_heapam``); and the cross-table invariants of the schema (every image's served body
agrees with its columns, every image has its ``create`` audit entry, no row is stamped
with a revision above ``catalog_state``'s, no id is both stored and deleted).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import sqlite3
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from cluster_engine.server.auth import mint_token
from cluster_engine.storage.db import audit_log, catalog_state, deleted_images, images
from cluster_engine.testing import LiveServer
from cluster_engine.testing.pgserver import PostgresServer

from .common import Load, Outcome, Report, body_matches_columns, org, seed_catalog, verify_ledger, worker_pids

NAME = "crash"
TITLE = "Server crash: kill -9 of a worker and of the whole server during writes (SQLite, PostgreSQL)"

WORKERS = 2
ORGS = 20
WRITE_SHARE = 0.7
RATE = 150.0  # requests/s in total, paced: a dead server is not hammered with reconnects
CONCURRENCY = 12
RESPAWN_WAIT = 10.0  # seconds to wait for a killed worker's replacement (or the server's exit)
GRACE = 0.5  # seconds after the service is back during which a request may still have gone to the old one


@dataclass
class Kill:
    what: str  # worker | server | server+postgres
    cycle: int
    at: float  # monotonic time of the SIGKILL
    back: float | None = None  # monotonic time the service answered /readyz 200 again (None: never)
    respawned: bool | None = None  # worker kills: granian replaced the worker, the server kept running
    respawn_s: float | None = None  # worker kills: seconds until the replacement worker started
    server_exit: int | None = None  # worker kills: the server's exit code, when it exited instead
    exit_s: float | None = None  # worker kills: seconds until the server exited

    @property
    def restart_s(self) -> float | None:
        return None if self.back is None else round(self.back - self.at, 2)


@dataclass
class Service:
    """The cluster-engine server on one database; ``targets`` is the list the load reads its URL from."""

    data_dir: Path
    database_url: str
    env: dict[str, str]
    server: LiveServer
    targets: list[str]
    pg: PostgresServer | None = None

    @classmethod
    def start(cls, data_dir: Path, database_url: str, pg: PostgresServer | None = None) -> Service:
        (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
        env = {
            "CE_JWT_SECRET": secrets.token_urlsafe(
                48
            ),  # kept across restarts, so the load's tokens stay valid
            "TMPDIR": str(data_dir / "tmp"),  # the metrics directory a killed server leaves behind
        }
        server = LiveServer.start(
            data_dir,
            database_url=database_url,
            env=env,
            args=["--workers", str(WORKERS), "--migrate"],
            timeout=60,
        )
        return cls(data_dir, database_url, env, server, [server.url], pg)

    def restart(self) -> None:
        """Start a new server on the same database and point the load at it."""
        self.server.stop()  # reaps the killed process, closes clients, kills any straggler of its group
        self.server = LiveServer.start(
            self.data_dir,
            database_url=self.database_url,
            env=self.env,
            args=["--workers", str(WORKERS)],
            timeout=60,
        )
        self.targets[0] = self.server.url  # the load picks the new URL up with its next request


# ------------------------------------------------------------------------------------------ kills


def kill_worker(service: Service, cycle: int) -> Kill:
    """SIGKILL one worker; wait for granian to replace it, or for the server to exit (then restart it)."""
    server = service.server
    pids = sorted(worker_pids(server))
    logged = len(server.log())
    kill = Kill("worker", cycle, time.monotonic())
    if not pids:  # the server is already gone (a worker crashed on its own and took it down)
        kill.respawned, kill.server_exit, kill.exit_s = False, server.process.wait(10), 0.0
        service.restart()
        kill.back = time.monotonic()
        return kill
    victim = pids[cycle % len(pids)]
    os.kill(victim, signal.SIGKILL)
    while time.monotonic() < kill.at + RESPAWN_WAIT:
        code = server.process.poll()
        if code is not None:
            kill.respawned, kill.server_exit = False, code
            kill.exit_s = round(time.monotonic() - kill.at, 2)
            break
        current = worker_pids(server)
        since = server.log()[logged:]
        respawning = since.find("Respawning worker-")
        if victim not in current and respawning >= 0 and "Started worker-" in since[respawning:]:
            kill.respawned = True
            kill.respawn_s = round(time.monotonic() - kill.at, 2)
            kill.back = _ready(server.url, kill.at + RESPAWN_WAIT)
            return kill
        time.sleep(0.02)
    if kill.respawned is None:  # neither replaced nor gone: take it down and start afresh
        kill.respawned = False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
    service.restart()
    kill.back = time.monotonic()
    return kill


def kill_server(service: Service, cycle: int, *, with_postgres: bool) -> Kill:
    """SIGKILL the server's process group (and PostgreSQL's, for a host crash); restart what was killed."""
    kill = Kill("server+postgres" if with_postgres else "server", cycle, time.monotonic())
    os.killpg(service.server.process.pid, signal.SIGKILL)
    if with_postgres:
        assert service.pg is not None
        service.pg.stop("kill")
    service.server.process.wait(10)
    if with_postgres:
        assert service.pg is not None
        service.pg.start_again()
    service.restart()
    kill.back = time.monotonic()
    return kill


def _ready(url: str, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic()
        time.sleep(0.02)
    return None


# ------------------------------------------------------------------------------------------ load


@dataclass
class Phase:
    start: float  # monotonic time the phase's outcomes count ``started`` from
    outcomes: list[Outcome]


@contextlib.contextmanager
def background(load: Load, seconds: float, phases: list[Phase], errors: list[str]) -> Iterator[None]:
    """Run one phase of ``load`` in a thread for ``seconds`` while the body runs; wait for it to end."""
    before = len(load.outcomes)

    def target() -> None:
        try:
            load.run(seconds)
        except Exception:
            errors.append(f"the load crashed:\n{traceback.format_exc()}")

    load.seed += 1  # image names derive from the seed: a new phase must not repeat the last one's
    load._start = None
    thread = threading.Thread(target=target, name="crash-load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(seconds + 60)
        start = getattr(load, "_start", None)
        if start is not None:
            phases.append(Phase(float(start), load.outcomes[before:]))


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def classify(phases: list[Phase], kills: list[Kill]) -> tuple[int, int, int, int, list[Outcome]]:
    """(served, cut by a kill, of those in flight at the SIGKILL, 503s, answers outside the contract not
    explained by a kill)."""
    spans = [(k.at, (k.back if k.back is not None else float("inf")) + GRACE) for k in kills]
    served = cut = in_flight = unavailable = 0
    bad: list[Outcome] = []
    for phase in phases:
        for o in phase.outcomes:
            began = phase.start + o.started
            ended = began + o.latency
            if o.status == 0 and any(began <= high and ended >= low for low, high in spans):
                cut += 1
                in_flight += any(began < k.at <= ended for k in kills)
            elif o.problem:
                bad.append(o)
            else:
                served += 1
                unavailable += o.status == 503
    return served, cut, in_flight, unavailable, bad


# ------------------------------------------------------------------------------------------ checks


def sync_engine(database_url: str) -> sa.Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url)


def served_matches_db(service: Service, report: Report, label: str) -> str:
    """Each org's list, as served by the restarted server (asked several times, so both workers answer),
    against the ids the database says that org sees."""
    service.server.wait_synced(timeout=10)
    engine = sync_engine(service.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(images.c.id, images.c.namespace)).all()
    finally:
        engine.dispose()
    matching, wrong = 0, []
    for index in range(ORGS):
        who = org(index)
        expected = {str(r.id) for r in rows if r.namespace in ("public", str(who))}
        token = mint_token(service.env["CE_JWT_SECRET"], who)
        answers = []
        for _ in range(3):  # new connections each time: the kernel spreads them over the workers
            response = httpx.get(
                f"{service.server.url}/v1/images", headers={"Authorization": f"Bearer {token}"}, timeout=10
            )
            answers.append({i["id"] for i in response.json()} if response.status_code == 200 else None)
        if all(a == expected for a in answers):
            matching += 1
        else:
            got = next((a for a in answers if a != expected), None)
            detail = (
                "no 200" if got is None else f"{len(got - expected)} extra, {len(expected - got)} missing"
            )
            wrong.append(f"org {index}: {detail}")
    report.check(not wrong, f"{label}: served lists differ from the database: {wrong[:5]}")
    return f"{matching}/{ORGS} orgs"


def consistency(database_url: str) -> list[str]:
    """The schema's cross-table invariants, as violations (empty: consistent)."""
    engine = sync_engine(database_url)
    problems: list[str] = []
    try:
        with engine.connect() as conn:
            revision = conn.scalar(sa.select(catalog_state.c.revision))
            stored = {str(r.id): r for r in conn.execute(sa.select(images)).all()}
            deleted = {str(r.id): int(r.revision) for r in conn.execute(sa.select(deleted_images)).all()}
            audits = conn.execute(
                sa.select(audit_log.c.image_id, audit_log.c.action, audit_log.c.revision)
            ).all()
    finally:
        engine.dispose()
    created = {str(a.image_id) for a in audits if a.action == "create"}
    deletes = {str(a.image_id) for a in audits if a.action == "delete"}
    mismatched = [i for i, r in stored.items() if not body_matches_columns(r)]
    newest = max(
        [int(r.revision) for r in stored.values()]
        + list(deleted.values())
        + [int(a.revision) for a in audits],
        default=0,
    )
    checks: list[tuple[Any, str]] = [
        (revision is not None, "catalog_state has no row"),
        (not mismatched, f"{len(mismatched)} images' served body differs from their columns"),
        (not (set(stored) - created), f"{len(set(stored) - created)} images have no create audit entry"),
        (
            not (set(deleted) - deletes),
            f"{len(set(deleted) - deletes)} deleted images have no delete audit entry",
        ),
        (
            not (set(stored) & set(deleted)),
            f"{len(set(stored) & set(deleted))} ids are both stored and deleted",
        ),
        (revision is None or newest <= revision, f"rows stamped with revision {newest} > catalog {revision}"),
    ]
    problems += [message for ok, message in checks if not ok]
    return problems


def sqlite_integrity(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
        foreign = conn.execute("PRAGMA foreign_key_check").fetchall()
    problems = [] if integrity == ["ok"] else [f"integrity_check: {integrity[:5]}"]
    if foreign:
        problems.append(f"foreign_key_check: {len(foreign)} violations, e.g. {foreign[:3]}")
    return problems


def postgres_integrity(database_url: str) -> tuple[list[str], str]:
    """amcheck over every B-tree index and every table of the schema; (problems, what was checked)."""
    import psycopg

    problems: list[str] = []
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        indexes = conn.execute(
            """SELECT c.relname FROM pg_index i
                 JOIN pg_class c ON c.oid = i.indexrelid
                 JOIN pg_class t ON t.oid = i.indrelid
                 JOIN pg_namespace n ON n.oid = t.relnamespace
                 JOIN pg_am am ON am.oid = c.relam
                WHERE n.nspname = 'public' AND am.amname = 'btree' ORDER BY 1"""
        ).fetchall()
        tables = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1"
        ).fetchall()
        for (name,) in indexes:
            try:
                conn.execute("SELECT bt_index_parent_check(%s::regclass, true, true)", (name,))
            except psycopg.Error as exc:
                problems.append(f"index {name}: {str(exc).strip()[:200]}")
        for (name,) in tables:
            rows = conn.execute("SELECT * FROM verify_heapam(%s::regclass)", (name,)).fetchall()
            if rows:
                problems.append(f"table {name}: {len(rows)} heap problems, e.g. {rows[:2]}")
    return problems, f"{len(indexes)} indexes, {len(tables)} tables"


# ------------------------------------------------------------------------------------------ drill


def drill_store(
    label: str,
    workdir: Path,
    database_url: str,
    report: Report,
    *,
    cycles: int,
    phase: float,
    tail: float,
    pg: PostgresServer | None = None,
    host_crash: Callable[[int], bool] = lambda _cycle: False,
) -> None:
    service = Service.start(workdir, database_url, pg)
    try:
        catalog = seed_catalog(workdir / "catalog.json", orgs=ORGS)
        service.server.cli("catalog", "import", str(catalog))
        service.server.wait_synced(timeout=10)
        load = Load(
            targets=service.targets,
            secret=service.env["CE_JWT_SECRET"],
            orgs=ORGS,
            concurrency=CONCURRENCY,
            rate=RATE,
            write_share=WRITE_SHARE,
            seed=0,
        )
        phases: list[Phase] = []
        kills: list[Kill] = []
        errors: list[str] = []
        for cycle in range(cycles):
            begun = time.monotonic()
            with background(load, phase, phases, errors):
                sleep_until(begun + 0.25 * phase)
                kills.append(kill_worker(service, cycle))
                sleep_until(max(begun + 0.6 * phase, time.monotonic() + 0.2 * phase))
                kills.append(kill_server(service, cycle, with_postgres=host_crash(cycle)))
        with background(load, tail, phases, errors):
            pass
        report.failures += [f"{label}: {e}" for e in errors]

        served, cut, in_flight, unavailable, bad = classify(phases, kills)
        sent = sum(len(p.outcomes) for p in phases)
        problems: dict[str, int] = {}
        for o in bad:
            key = (o.problem or "")[:100]
            problems[key] = problems.get(key, 0) + 1
        report.check(not bad, f"{label}: {len(bad)} answers outside the contract, e.g. {_worst(problems)}")
        report.check(served > 0, f"{label}: no request was served")

        worker_kills = [k for k in kills if k.what == "worker"]
        respawned = [k for k in worker_kills if k.respawned]
        exited = [k for k in worker_kills if k.server_exit is not None]
        restarts = [k.restart_s for k in kills if k.restart_s is not None]
        report.check(
            len(restarts) == len(kills),
            f"{label}: the service did not come back after {len(kills) - len(restarts)} kills",
        )
        report.check(
            len(respawned) == len(worker_kills),
            f"{label}: {len(worker_kills) - len(respawned)} of {len(worker_kills)} worker kills were not "
            "survived by the server: "
            + (
                f"granian shut the whole server down (exit code {exited[0].server_exit}, "
                f"{_median([k.exit_s for k in exited])} s after the kill) instead of respawning the worker"
                if exited
                else "the worker was neither replaced nor the server stopped"
            ),
        )

        f = report.figures
        f[f"{label}: kill cycles"] = cycles
        f[f"{label}: kills"] = ", ".join(
            f"{n} {what}" for what in ("worker", "server", "server+postgres") if (n := _count(kills, what))
        )
        f[f"{label}: worker respawned"] = (
            f"{len(respawned)}/{len(worker_kills)}"
            + (f", in {_median([k.respawn_s for k in respawned])} s (median)" if respawned else "")
            + (
                f"; server exited (code {exited[0].server_exit}) {_median([k.exit_s for k in exited])} s "
                "after the kill (median), restarted"
                if exited
                else ""
            )
        )
        for what in ("worker", "server", "server+postgres"):
            times = [k.restart_s for k in kills if k.what == what and k.restart_s is not None]
            if times:
                f[f"{label}: back after a {what} kill, SIGKILL to /readyz 200 (s)"] = _spread(times)
        f[f"{label}: requests sent"] = sent
        f[f"{label}: requests served"] = served
        f[f"{label}: 503 answers (contract body)"] = unavailable
        f[f"{label}: requests cut by the kills"] = (
            f"{cut} ({in_flight} in flight at a SIGKILL, the rest sent while down)"
        )
        f[f"{label}: answers outside the contract"] = len(bad)

        f[f"{label}: served lists equal the database"] = served_matches_db(service, report, label)
        service.server.stop()
        crashes = worker_crashes(service.data_dir)
        f[f"{label}: workers that crashed on their own"] = len(crashes)
        report.check(
            not crashes,
            f"{label}: {len(crashes)} workers died of an exception (not a drill kill), e.g. {crashes[:2]}",
        )
        verify_ledger(database_url, load.ledger, report, label)
        problems_found = consistency(database_url)
        if pg is None:
            path = make_url(database_url).database
            assert path is not None
            integrity = sqlite_integrity(Path(path))
            checked = "integrity_check ok, foreign_key_check empty"
        else:
            integrity, what = postgres_integrity(database_url)
            checked = f"amcheck ok ({what})"
        f[f"{label}: integrity check"] = checked if not integrity else "; ".join(integrity)
        f[f"{label}: schema invariants"] = "hold" if not problems_found else "; ".join(problems_found)
        report.check(not integrity, f"{label}: integrity check failed: {integrity}")
        report.check(not problems_found, f"{label}: schema invariants violated: {problems_found}")
        report.details.append(
            f"- {label}: restart times by kill: "
            + ", ".join(f"{k.what} {k.restart_s if k.restart_s is not None else 'never'}" for k in kills)
        )
    finally:
        service.server.stop()


_EXCEPTION_LINE = re.compile(r"^(?!Traceback)[A-Za-z_][\w.]*(?:: [^\n]*)?$", re.M)  # "struct.error: ..."


def worker_crashes(data_dir: Path) -> list[str]:
    """Workers that died of an exception (a SIGKILLed one leaves no traceback), from every server's log:
    the exception line of each."""
    found = []
    for log in sorted(data_dir.glob("server-*.log")):
        text = log.read_text(errors="replace")
        for banner in re.finditer(r"^Process granian-worker[^\n]*:$", text, re.M):
            line = _EXCEPTION_LINE.search(text, banner.end())
            found.append(f"{log.name}: {line.group(0)[:200] if line else 'unknown exception'}")
    return found


def _count(kills: list[Kill], what: str) -> int:
    return sum(1 for k in kills if k.what == what)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _spread(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.2f}, max {max(values):.2f}"


def _worst(problems: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(problems.items(), key=lambda kv: -kv[1])[:3]


def run(workdir: Path, *, short: bool) -> Report:
    cycles = 1 if short else 5
    phase = 8.0 if short else 10.0
    tail = 3.0 if short else 5.0
    report = Report()
    began = time.monotonic()
    drill_store(
        "SQLite",
        workdir / "sqlite",
        f"sqlite:///{workdir / 'sqlite' / 'cluster-engine.db'}",
        report,
        cycles=cycles,
        phase=phase,
        tail=tail,
    )
    report.figures["SQLite: seconds"] = round(time.monotonic() - began, 1)
    began = time.monotonic()
    pg = PostgresServer.start(durable=True)
    try:
        drill_store(
            "PostgreSQL",
            workdir / "postgres",
            pg.create_database(),
            report,
            cycles=cycles,
            phase=phase,
            tail=tail,
            pg=pg,
            host_crash=lambda cycle: cycle % 2 == 1 or short,
        )
    finally:
        pg.destroy()
    report.figures["PostgreSQL: seconds"] = round(time.monotonic() - began, 1)
    report.details.insert(
        0,
        f"Each kill cycle: {phase:.0f} s of paced load ({RATE:.0f} requests/s, {WRITE_SHARE:.0%} writes, "
        f"{CONCURRENCY} connections, {ORGS} orgs) against {WORKERS} workers; one worker SIGKILLed at 25%, "
        "the whole server's process group at 60% (on PostgreSQL every second cycle — in the short run, "
        "every cycle — PostgreSQL too), each time restarted on the same database; then "
        f"{tail:.0f} s of load on the last server.",
    )
    return report
