"""The cold path in process: what an org's first request costs the worker when its images are not held.

    ./dev run python -m bench cold [--orgs 1250] [--per-org 80] [--store sqlite|postgresql]

Builds a catalog of ``--orgs`` orgs with ``--per-org`` Customized images each (plus the benchmark's 800
Public images) with ``cluster-engine catalog import``, then, on a fresh read model each time:

- ``one by one``: every org loaded alone, one after another (each first request finds nothing else to
  share its query with): CPU and wall time per org;
- ``burst``: every org asked for at once, as a restarted worker meets its traffic: wall time until all are
  held and CPU per org;
- ``preload``: the warm start a worker does before it is ready (when the code has it).

CPU is the process's CPU time (``time.process_time``: the event loop and the driver's threads), so the
machine's noise moves it far less than wall time. Medians of ``--rounds``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .catalog import IDCS, NAMESPACE, make_image, org_id, public_images, write_images
from .common import CLUSTER_ENGINE

PER_ORG_SEED = 7


def write_catalog(path: Path, orgs: int, per_org: int) -> list[str]:
    """Public images plus ``per_org`` Customized images for each of ``orgs`` orgs; returns the org ids."""
    org_ids = [str(org_id(n)) for n in range(orgs)]

    def customized() -> Iterator[dict[str, Any]]:
        for n, org in enumerate(org_ids):
            rng = random.Random(PER_ORG_SEED * 1_000_003 + n)
            for k in range(per_org):
                yield make_image(
                    rng,
                    image_id=uuid.uuid5(NAMESPACE, f"cold-{n}-{k}"),
                    kind="Customized",
                    org=uuid.UUID(org),
                    idc=IDCS[rng.randrange(len(IDCS))],
                    name=f"Cold-{n:05d}-{k:03d}",
                    created=f"2026-02-{1 + k % 28:02d}T{k % 24:02d}:00:00Z",
                )

    write_images(path, itertools.chain(public_images(), customized()))
    return org_ids


async def one_round(url: str, orgs: list[str]) -> dict[str, float]:
    from cluster_engine.server.readmodel import Catalog
    from cluster_engine.testing.stores import opened_store

    figures: dict[str, float] = {}
    async with opened_store(url) as store:
        catalog = Catalog(store, max_images=10_000_000, max_orgs=10_000_000)
        await catalog.refresh()
        cpu, wall = time.process_time(), time.perf_counter()
        for org in orgs:
            await catalog.load_org(org)
        figures["one by one: CPU ms per org"] = (time.process_time() - cpu) * 1000 / len(orgs)
        figures["one by one: wall ms per org"] = (time.perf_counter() - wall) * 1000 / len(orgs)

        catalog = Catalog(store, max_images=10_000_000, max_orgs=10_000_000)
        await catalog.refresh()
        cpu, wall = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(catalog.load_org(org) for org in orgs), return_exceptions=True)
        figures["burst: wall s for all"] = time.perf_counter() - wall
        figures["burst: CPU ms per org"] = (time.process_time() - cpu) * 1000 / len(orgs)
        figures["burst: failed loads"] = sum(1 for r in results if isinstance(r, BaseException))

        if hasattr(Catalog, "preload"):
            catalog = Catalog(store)
            await catalog.refresh()
            cpu, wall = time.process_time(), time.perf_counter()
            await catalog.preload()
            figures["preload: wall s"] = time.perf_counter() - wall
            figures["preload: CPU s"] = time.process_time() - cpu
            figures["preload: orgs held"] = catalog.held()["orgs"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench cold", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orgs", type=int, default=1250)
    parser.add_argument("--per-org", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    opts = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ce-cold-"))
    catalog_file = workdir / "catalog.json"
    orgs = write_catalog(catalog_file, opts.orgs, opts.per_org)
    server = None
    if opts.store == "postgresql":
        from cluster_engine.testing.pgserver import PostgresServer

        server = PostgresServer.start()
        url = server.create_database()
    else:
        url = f"sqlite:///{workdir / 'cold.db'}"
    env = {**os.environ, "CE_DATABASE_URL": url}
    try:
        for command in (["db", "upgrade"], ["catalog", "import", str(catalog_file)]):
            subprocess.run([CLUSTER_ENGINE, *command], env=env, check=True, capture_output=True)
        rounds = [asyncio.run(one_round(url, orgs)) for _ in range(opts.rounds)]
    finally:
        if server is not None:
            server.destroy()
    print(f"cold path, {opts.store}, {opts.orgs} orgs x {opts.per_org} images, medians of {opts.rounds}")
    for key in rounds[0]:
        values: list[Any] = [r[key] for r in rounds]
        print(f"  {key:32} {statistics.median(values):10.3f}")
    return 0
