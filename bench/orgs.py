"""Benchmark the read path of cluster-engine with many tokens: every org of the catalog asking at once.

    ./dev run python -m bench orgs [--sizes 100000] [--duration 10] [--rounds 2] [--connections 64]
                                   [--warmup 3] [--restart-duration 10] [--pairs 1] [--write-rate 10]
                                   [--scenarios single,spread,…] [--quick] [--store sqlite|postgresql]
                                   [--out FILE.md] [--keep] [--reuse KEPT_WORKDIR]

Per catalog size N: a deterministic catalog shaped like real traffic (the 800 Public images of
``bench run``, then Customized images in orgs of 80, plus as many orgs without any), loaded with
``cluster-engine catalog import`` (timed, peak RSS), one token per org minted with PyJWT (the secret the
server is given), then for each scenario a fresh ``cluster-engine serve`` (one worker, pinned to the
first CPU) and ``wrk -t1`` (pinned to the second CPU) with bench/orgs.lua rotating the tokens. Scenarios:
``single`` (one org's token: the reference), ``spread`` (every org's token in turn), ``spread_hook``
(spread, counting statuses in a wrk ``response()`` hook: what the hook costs wrk), ``restart`` (spread
from the moment the server is ready, no warm-up, per-second throughput), ``spread_writes`` and
``single_writes`` (with a writer process creating and deleting Customized images at ~10/s). Only medians
over rounds are reported. See bench/README.md, "Many tokens".
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx

from . import harness
from .catalog import N_PUBLIC, ORGS_IMAGES_PER_ORG, ORGS_SEED, OrgsCatalog, Pair, write_orgs_catalog
from .common import BenchError, log
from .orgs_report import ALL_TOKENS, SCENARIOS, Measured, SizeReport, render_report
from .processes import (
    Cores,
    Imported,
    Store,
    cli_token,
    import_catalog,
    size_dir,
    start_service,
    worker_pid,
    worker_rss,
)
from .report import mib
from .writer import SCOPE_WRITE, Writer, bearer, create_body, mint
from .wrk import run_lua_wrk

WITH_WRITER = {"spread_writes", "single_writes"}


@dataclasses.dataclass
class Options:
    sizes: list[int]
    duration: int
    rounds: int
    connections: int
    warmup: int
    restart_duration: int
    pairs: int
    write_rate: float
    scenarios: list[str]
    quick: bool
    store: str
    out: Path | None
    keep: bool
    reuse: Path | None


def _checked_list(client: httpx.Client, catalog: OrgsCatalog, org: uuid.UUID, pair: Pair) -> httpx.Response:
    """``org``'s filtered list for ``pair``, checked: Public + its own images, nothing else."""
    target = f"/v1/images?idc={pair[0]}&product={pair[1]}"
    response = client.get(target, headers=bearer(org))
    if response.status_code != 200:
        raise BenchError(f"org {org}: {target} → {response.status_code} {response.text[:300]}")
    data = response.json()
    if len(data) != catalog.expected(org, pair):
        raise BenchError(
            f"org {org}: {target} has {len(data)} images, expected {catalog.expected(org, pair)}"
        )
    wrong = [
        i
        for i in data
        if i["idc"] != pair[0]
        or pair[1] not in i["supportedProducts"]
        or (i["type"] == "Customized" and i["orgId"] != str(org))
    ]
    if wrong:
        raise BenchError(f"org {org}: {target} holds {len(wrong)} images it should not")
    return response


def check(base: str, catalog: OrgsCatalog, cli_token: str) -> list[str]:
    """Real answers for a sample of orgs: each one's filtered list is Public + its own images, the PyJWT
    token and the CLI's give the same bytes, and one write of the writer's shape is accepted."""
    rng = random.Random(ORGS_SEED)
    sample = [catalog.org, *rng.sample(catalog.orgs_with[1:], min(10, len(catalog.orgs_with) - 1))]
    sample += rng.sample(catalog.orgs_without, min(5, len(catalog.orgs_without)))
    notes: list[str] = []
    with httpx.Client(base_url=base, timeout=30.0) as client:
        for pair in catalog.pairs:
            for org in sample:
                response = _checked_list(client, catalog, org, pair)
                if org != catalog.org or pair != catalog.pairs[0]:
                    continue
                target = catalog.targets[0]
                by_cli = client.get(target, headers={"Authorization": f"Bearer {cli_token}"})
                if by_cli.content != response.content:
                    raise BenchError("the CLI's token and the PyJWT token get different answers")
                data = response.json()
                own = sum(1 for i in data if i["type"] == "Customized")
                notes.append(
                    f"`single` query `{target}`: {len(data)} images ({own} of the caller's own),"
                    f" {len(response.content):,} bytes; the CLI's and PyJWT's tokens get the same bytes"
                )
        sizes = [catalog.expected(org, catalog.pairs[0]) for org in catalog.all_orgs]
        notes.append(
            f"`spread` answers for `{catalog.targets[0]}`: {min(sizes)} to {max(sizes)} images"
            f" (median {statistics.median(sizes):g}); checked for {len(sample)} orgs"
            f" ({len(sample) - min(5, len(catalog.orgs_without))} with Customized images)"
            + (f", on {len(catalog.pairs)} pairs" if len(catalog.pairs) > 1 else "")
        )
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        if "ImageCreateReq" not in schema:
            raise BenchError("the served OpenAPI document has no ImageCreateReq")
        org = catalog.orgs_without[0]
        writer_auth = bearer(org, [SCOPE_WRITE])
        created = client.post("/v1/images", json=create_body(rng, org), headers=writer_auth)
        if created.status_code != 201:
            raise BenchError(f"the writer's create → {created.status_code} {created.text[:300]}")
        deleted = client.delete(f"/v1/images/{created.json()['id']}", headers=writer_auth)
        if deleted.status_code != 204:
            raise BenchError(f"the writer's delete → {deleted.status_code} {deleted.text[:300]}")
        notes.append("the writer's create (201) and delete (204) checked once")
    return notes


# -------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class Context:
    opts: Options
    cores: Cores
    env: dict[str, str]
    catalog: OrgsCatalog
    single_tokens: Path
    all_tokens: Path
    sizedir: Path


def run_scenario(ctx: Context, scenario: str, round_index: int) -> Measured:
    opts, cores, catalog = ctx.opts, ctx.cores, ctx.catalog
    rundir = ctx.sizedir / f"{scenario}-{round_index + 1}"
    rundir.mkdir()
    tokens = ctx.all_tokens if scenario in ALL_TOKENS else ctx.single_tokens
    service, base, startup_s = start_service(ctx.env, cores, rundir, catalog.n)
    ready_at = time.time()
    worker = worker_pid(service)
    writer: Writer | None = None
    load = (cores, base, tokens, catalog.targets, opts.connections)
    try:
        if scenario == "restart":
            run = run_lua_wrk(*load, opts.restart_duration, ready_at, worker=worker)
        else:
            if scenario in WITH_WRITER:
                seed = ORGS_SEED + 1000 * round_index + list(SCENARIOS).index(scenario)
                writer = Writer(cores, base, catalog.all_orgs, opts.write_rate, seed, rundir)
            hook = scenario == "spread_hook"
            run_lua_wrk(*load, opts.warmup, status_hook=hook)
            run = run_lua_wrk(*load, opts.duration, status_hook=hook, worker=worker)
        writes = writer.finish((run.started, run.ended)) if writer else None
        if not service.alive():
            raise BenchError(f"the service died during {scenario}:\n{service.log_tail()}")
        rss_after, _ = worker_rss(service)
        return Measured(scenario, round_index, startup_s, run, rss_after, writes, ready_at)
    finally:
        if writer is not None:
            writer.stop()
        service.stop()


def _write_tokens(path: Path, tokens: Sequence[str]) -> Path:
    path.write_text("".join(token + "\n" for token in tokens), encoding="ascii")
    return path


def _reused(reuse: Path, n: int, env: dict[str, str], catalog_path: Path) -> Imported:
    """The database of an earlier run with --keep, copied (the scenarios write)."""
    imported = reuse / f"data-{n}"
    data_dir = Path(env["CE_DATA_DIR"])
    for name in ("cluster-engine.db", "cluster-engine.db-wal"):
        if (imported / name).exists():
            shutil.copyfile(imported / name, data_dir / name)
    log(f"N={n}: reused the import in {imported}")
    return Imported(catalog_path.stat().st_size / 1e6, f"reused the import in {imported}", 0.0, 0)


def bench_size(n: int, opts: Options, cores: Cores, store: Store, workdir: Path) -> SizeReport:
    sizedir, catalog_path = size_dir(workdir, n)
    catalog = write_orgs_catalog(n, catalog_path, opts.pairs)
    env = store.env_for(n)
    if opts.reuse is not None:
        imported = _reused(opts.reuse, n, env, catalog_path)
    else:
        imported = import_catalog(n, store, env, catalog_path, sizedir)
    if not opts.keep:
        catalog_path.unlink()
    token = cli_token(env, catalog.org)
    orgs = catalog.all_orgs
    random.Random(ORGS_SEED).shuffle(orgs)  # with and without Customized images, mixed
    all_tokens = _write_tokens(sizedir / "tokens-all.txt", [mint(org) for org in orgs])
    single_tokens = _write_tokens(sizedir / "tokens-single.txt", [token])
    log(
        f"N={n}: {len(orgs):,} tokens ({len(catalog.orgs_with):,} orgs with Customized images,"
        f" {len(catalog.orgs_without):,} without)"
    )
    checkdir = sizedir / "check"
    checkdir.mkdir()
    service, base, startup_s = start_service(env, cores, checkdir, n)
    try:
        log(f"N={n}: service ready after {startup_s:.1f}s; checking answers")
        rss_idle, _ = worker_rss(service)
        notes = check(base, catalog, token)
    finally:
        service.stop()

    ctx = Context(opts, cores, env, catalog, single_tokens, all_tokens, sizedir)
    runs: list[Measured] = []
    names = opts.scenarios
    for round_index in range(opts.rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        log(f"N={n}: round {round_index + 1}/{opts.rounds}: {', '.join(order)}")
        for scenario in order:
            measured = run_scenario(ctx, scenario, round_index)
            runs.append(measured)
            result = measured.run.result
            extra = ""
            if measured.writes:
                extra = f", {measured.writes.rate:.1f} writes/s ({measured.writes.failed} failed)"
            log(
                f"N={n}: {scenario}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.1f} ms,"
                f" {result.errors} errors{extra};"
                f" start-up {measured.startup_s:.1f}s, worker RSS {mib(measured.rss_after_kib)} MiB"
            )
    return SizeReport(
        n, imported, len(catalog.orgs_with), len(catalog.orgs_without), startup_s, rss_idle, notes, runs
    )


# ------------------------------------------------------------------------------------------- main


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}; got {text!r}")
    return [name for name in SCENARIOS if name in names]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = harness.parser(__doc__, [100_000], N_PUBLIC + ORGS_IMAGES_PER_ORG)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; medians are reported")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of the same load before measuring")
    parser.add_argument("--restart-duration", type=int, default=10, help="seconds of the restart run")
    parser.add_argument("--pairs", type=int, default=1, help="(idc, product) pairs the spread rotates over")
    parser.add_argument("--write-rate", type=float, default=10.0, help="writer: writes per second")
    parser.add_argument("--scenarios", type=_names, default=list(SCENARIOS), help=", ".join(SCENARIOS))
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N=10000, 2 s runs, 1 round, 1 s warm-up"
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="SQLite: copy each size's imported database from this work directory (kept by --keep) "
        "instead of importing again",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.duration, args.rounds, args.warmup, args.restart_duration = [10_000], 2, 1, 1, 3
    if min(args.duration, args.rounds, args.warmup, args.restart_duration, args.connections, args.pairs) < 1:
        parser.error("--duration, --rounds, --warmup, --restart-duration, --connections, --pairs must be ≥ 1")
    if not 0 < args.write_rate <= 1000:
        parser.error("--write-rate must be in (0, 1000]")
    if any(n <= N_PUBLIC + ORGS_IMAGES_PER_ORG for n in args.sizes):
        parser.error(f"every size must exceed {N_PUBLIC + ORGS_IMAGES_PER_ORG} (Public images + one org)")
    if args.reuse is not None:
        missing = [n for n in args.sizes if not (args.reuse / f"data-{n}" / "cluster-engine.db").is_file()]
        if args.store != "sqlite" or missing:
            parser.error(f"--reuse needs --store sqlite and a kept import of every size (missing: {missing})")
    if "single" not in args.scenarios:
        args.scenarios = ["single", *args.scenarios]  # the reference of every ratio
    return Options(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    found_versions = harness.versions(detailed_changes=True)  # at the start: src/ may change meanwhile
    return harness.run_sizes(
        "ce-bench-orgs-",
        opts,
        lambda n, cores, store, workdir: bench_size(n, opts, cores, store, workdir),
        lambda reports, cores: render_report(reports, opts, cores, found_versions),
    )
