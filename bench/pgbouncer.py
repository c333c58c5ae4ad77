"""What the PgBouncer mode (``pgbouncer=true`` in the URL) costs the service's database calls.

    ./dev run python -m bench pgbouncer [--n 1000] [--rounds 9]

One throwaway PostgreSQL server, one throwaway PgBouncer (transaction pooling) in front of it, a catalog
of 300 Public images and 20 orgs with 30 Customized images each. Each case runs the service's own
``Store`` calls one after another on one connection (so this is latency, not throughput):

- ``poll``: ``changes_since(current)``, what every worker does each CE_POLL_INTERVAL (nothing changed);
- ``org load``: ``load_namespaces([org])``, an org's first request when it is not held (30 images);
- ``write``: ``create_image``, one Public image (revision bump, insert, audit row, COMMIT).

Cases: ``direct`` (as without PgBouncer: statement timeout as a startup parameter, psycopg prepares
statements it sees 5 times), ``direct, no prepare`` (``prepare_threshold=None`` only), ``direct,
pgbouncer=true`` (the mode's whole cost against the same server: no prepared statements, ``BEGIN READ
WRITE; SET LOCAL statement_timeout = …`` opening each transaction) and ``via PgBouncer`` (the mode
through PgBouncer itself). Each cell is the median over ``--rounds`` rounds of the per-call median, in
microseconds, with the rounds' range; the cases alternate within each round so the machine's noise
spreads over all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event

from cluster_engine.schemas import ImageCreateReq, ImageType
from cluster_engine.storage.records import Actor
from cluster_engine.storage.store import Store
from cluster_engine.testing.pgbouncer import PgBouncer, version
from cluster_engine.testing.pgserver import PostgresServer
from cluster_engine.testing.samples import image_spec

from .report import table

ORGS, PER_ORG, PUBLIC = 20, 30, 300


def spec(name: str, org: uuid.UUID | None = None) -> ImageCreateReq:
    return image_spec(org or uuid.UUID(int=1), name)


async def timed(call: Callable[[], Awaitable[Any]], n: int) -> float:
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e6


async def measure(url: str, bouncer: PgBouncer, n: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    orgs = [uuid.uuid4() for _ in range(ORGS)]
    seeding = Store.open(url, statement_timeout=None)
    for index in range(PUBLIC):
        await seeding.create_image(spec(f"public-{index}"), ImageType.PUBLIC, Actor(None, "bench"))
    for org in orgs:
        for index in range(PER_ORG):
            await seeding.create_image(spec(f"own-{index}", org), ImageType.CUSTOMIZED, Actor(org, "bench"))
    await seeding.close()

    def no_prepare(store: Store) -> Store:
        @event.listens_for(store.engine.sync_engine, "do_connect")
        def connect(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
            params["prepare_threshold"] = None

        return store

    cases: dict[str, Store] = {
        "direct": Store.open(url),
        "direct, no prepare": no_prepare(Store.open(url)),
        "direct, pgbouncer=true": Store.open(f"{url}?pgbouncer=true"),
        "via PgBouncer": Store.open(bouncer.url(url)),
    }
    results: dict[str, dict[str, list[float]]] = {case: {} for case in cases}
    written = 0

    async def write(store: Store) -> None:
        nonlocal written
        written += 1
        await store.create_image(spec(f"w-{written}"), ImageType.PUBLIC, Actor(None, "bench"))

    for round_ in range(rounds):
        for case, store in cases.items():
            revision = await store.revision()
            org = str(orgs[round_ % ORGS])
            calls: list[tuple[str, Callable[[], Awaitable[Any]], int]] = [
                ("poll", lambda s=store, r=revision: s.changes_since(r), n),  # type: ignore[misc]
                ("org load", lambda s=store, o=org: s.load_namespaces([o]), n),  # type: ignore[misc]
                ("write", lambda s=store: write(s), max(50, n // 10)),  # type: ignore[misc]
            ]
            for name, call, count in calls:
                results[case].setdefault(name, []).append(await timed(call, count))
    for store in cases.values():
        await store.close()
    return results


def main(argv: list[str] | None = None) -> int:
    from cluster_engine.storage import db

    parser = argparse.ArgumentParser(
        prog="python -m bench pgbouncer", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="calls per case and round")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    with PostgresServer.start() as postgres, PgBouncer.start(postgres.port) as bouncer:
        url = postgres.create_database()
        db.upgrade(url)  # Alembic runs its own event loop: before ours
        results = asyncio.run(measure(url, bouncer, args.n, args.rounds))
    rounds = f"median of {args.rounds} rounds (their range)"
    print(f"{version()}, microseconds per call (lower is better): {rounds}\n")
    names = ["poll", "org load", "write"]
    rows = [
        [
            case,
            *(
                f"{statistics.median(by[name]):.0f} ({min(by[name]):.0f}-{max(by[name]):.0f})"
                for name in names
            ),
        ]
        for case, by in results.items()
    ]
    print("\n".join(table(["case", *names], rows, "l" + "r" * len(names))))
    return 0
