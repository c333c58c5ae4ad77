"""What idle workers' polling costs PostgreSQL and PgBouncer's pool.

    ./dev run python -m bench polls [--workers 4] [--seconds 20] [--rounds 2]

One throwaway PostgreSQL, one throwaway PgBouncer (transaction pooling, pool 20) in front of it, a migrated
empty catalog, and ``cluster-engine serve --workers W`` with the service's defaults (poll every 0.25 s)
that nobody sends a request to, first directly and then through PgBouncer (``pgbouncer=true``), the two
alternated ``--rounds`` times. Over ``--seconds`` s of idleness each case reports the transactions/s
on the service's database (``pg_stat_database``), the workers' CPU (``/proc``) and, through PgBouncer,
its own counters (``SHOW STATS``): queries per transaction and how long a transaction held one of its
server connections on average (``total_xact_time`` / ``total_xact_count``), the share of a small pool that
a fleet's idle polls keep busy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from cluster_engine.storage import db
from cluster_engine.testing import free_port
from cluster_engine.testing.pgbouncer import PgBouncer
from cluster_engine.testing.pgserver import PostgresServer

SETTLE = 8.0  # s after the start before measuring (workers up, first polls done)


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def _xacts(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _bouncer_stats(bouncer: PgBouncer, database: str) -> dict[str, Any]:
    return next(r for r in bouncer.admin("SHOW STATS") if r["database"] == database)


def measure(url: str, direct_url: str, workers: int, seconds: float, bouncer: PgBouncer | None) -> str:
    env = {**os.environ, "CE_DATABASE_URL": url, "CE_JWT_SECRET": "bench-polls-" + "x" * 32}
    env.pop("CE_DATA_DIR", None)
    argv = [
        sys.executable,
        "-m",
        "cluster_engine",
        "serve",
        "--port",
        str(free_port()),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(
        [*argv, "--workers", str(workers)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(SETTLE)
        children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True)
        pids = [int(p) for p in children.stdout.split()]
        database = direct_url.rsplit("/", 1)[1]
        x0, c0 = _xacts(direct_url), _cpu_ticks(pids)
        s0 = _bouncer_stats(bouncer, database) if bouncer else None
        time.sleep(seconds)
        x1, c1 = _xacts(direct_url), _cpu_ticks(pids)
        s1 = _bouncer_stats(bouncer, database) if bouncer else None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    line = (
        f"{(x1 - x0) / seconds:5.1f} transactions/s on the database, workers' CPU "
        f"{(c1 - c0) / seconds:.2f}% of a core (all {len(pids)})"
    )
    if s0 is not None and s1 is not None:
        xacts = s1["total_xact_count"] - s0["total_xact_count"]
        queries = s1["total_query_count"] - s0["total_query_count"]
        held = (s1["total_xact_time"] - s0["total_xact_time"]) / max(1, xacts)
        line += (
            f"; PgBouncer: {queries / max(1, xacts):.2f} queries per transaction, "
            f"a server connection held {held:.0f} µs each"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench polls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with PostgresServer.start() as pg:
        direct_url = pg.create_database()
        db.upgrade(direct_url)
        bouncer = PgBouncer.start(pg.port, settings={"default_pool_size": "20"})
        try:
            for round_ in range(1, args.rounds + 1):
                for label, url, via in (
                    ("direct", direct_url, None),
                    ("PgBouncer", bouncer.url(direct_url), bouncer),
                ):
                    figures = measure(url, direct_url, args.workers, args.seconds, via)
                    print(f"round {round_}, {args.workers} idle workers, {label:9}: {figures}", flush=True)
        finally:
            bouncer.destroy()
    return 0
