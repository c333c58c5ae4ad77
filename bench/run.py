"""Benchmark the read path of cluster-engine against raw-ASGI and raw-RSGI floors and nginx.

    ./dev run python -m bench run [--sizes 1000,100000,1000000] [--duration 5] [--rounds 3]
                                  [--connections 16,64] [--quick] [--store sqlite|postgresql] [--out FILE.md]
                                  [--service-env KEY=VALUE ...]

Per catalog size N: generate a deterministic catalog file, load it with ``cluster-engine catalog import``
(timed), start ``cluster-engine serve`` (one worker, pinned to the first CPU), verify every scenario once
with real requests, start the two baselines (bench/baseline_app.py on the same Granian setup, over ASGI and
over RSGI) and nginx with the service's exact response bytes, then run ``wrk`` (pinned to the second CPU)
against the four servers, alternating, for ``--rounds`` rounds. Only medians over rounds are reported.
``--service-env KEY=VALUE`` (repeatable) is put in the service's environment only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from . import harness
from .catalog import N_PUBLIC, write_catalog
from .common import BenchError, int_list, log
from .nginx import FLOORS, start_floors
from .processes import (
    SET_BY_BENCH,
    Cores,
    Imported,
    Process,
    Store,
    cli_token,
    import_catalog,
    size_dir,
    start_service,
    worker_rss,
)
from .report import div, fmt_ms, fmt_ratio, fmt_rps, median, mib, table
from .scenarios import SCENARIOS, Scenario, capture, scenarios_for
from .wrk import WrkResult, run_wrk

SERVERS = ("service", *FLOORS)
# how the report names each server
TITLES = {"service": "svc", "asgi": "ASGI", "rsgi": "RSGI", "nginx": "nginx"}


@dataclasses.dataclass
class SizeReport:
    n: int
    imported: Imported
    startup_s: float
    rss_worker_kib: int | None
    rss_main_kib: int | None
    rss_after_kib: int | None
    notes: list[str]
    body_bytes: dict[str, int]
    # (scenario, connections, server) → one WrkResult per round
    results: dict[tuple[str, int, str], list[WrkResult]]

    def of(self, key: str, connections: int, server: str) -> list[WrkResult]:
        return self.results.get((key, connections, server), [])


@dataclasses.dataclass
class Options:
    sizes: list[int]
    duration: int
    rounds: int
    connections: list[int]
    quick: bool
    store: str
    out: Path | None
    keep: bool
    service_env: dict[str, str]


def measure(
    opts: Options,
    cores: Cores,
    servers: dict[str, tuple[Process, str]],
    token: str,
    scenarios: list[Scenario],
) -> dict[tuple[str, int, str], list[WrkResult]]:
    """``opts.rounds`` rounds of wrk runs, every scenario, connection count and server, the servers' order
    rotated each round; every server must still be alive before each run."""
    results: dict[tuple[str, int, str], list[WrkResult]] = {}
    for round_index in range(opts.rounds):
        shift = round_index % len(SERVERS)
        order = SERVERS[shift:] + SERVERS[:shift]
        runs = len(scenarios) * len(opts.connections) * len(SERVERS)
        log(f"round {round_index + 1}/{opts.rounds} ({runs} runs of {opts.duration}s)")
        for scenario in scenarios:
            for connections in opts.connections:
                for server in order:
                    for process, _ in servers.values():
                        if not process.alive():
                            raise BenchError(f"{process.name} died:\n{process.log_tail()}")
                    url = servers[server][1] + scenario.target
                    result = run_wrk(cores, url, scenario.request_headers(token), connections, opts.duration)
                    results.setdefault((scenario.key, connections, server), []).append(result)
    return results


def bench_size(n: int, opts: Options, cores: Cores, store: Store, workdir: Path) -> SizeReport:
    sizedir, catalog_path = size_dir(workdir, n)
    info = write_catalog(n, catalog_path)
    env = store.env_for(n)
    imported = import_catalog(n, store, env, catalog_path, sizedir)
    token = cli_token(env, info.org)
    processes: list[Process] = []
    try:
        service, base, startup_s = start_service({**env, **opts.service_env}, cores, sizedir, n)
        processes.append(service)
        log(f"N={n}: service ready at {base} after {startup_s:.1f}s")
        scenarios = scenarios_for(info)
        notes = capture(base, token, info, scenarios)
        rss_worker, rss_main = worker_rss(service)
        floors, bases = start_floors(cores, sizedir, token, scenarios)
        processes += floors.values()
        servers = {"service": (service, base), **{name: (floors[name], bases[name]) for name in floors}}
        if not opts.quick:
            log(f"N={n}: warming up")
            for _process, url in servers.values():
                for scenario in scenarios:
                    run_wrk(cores, url + scenario.target, scenario.request_headers(token), 16, 1)
        log(f"N={n}: measuring")
        results = measure(opts, cores, servers, token, scenarios)
        rss_after, _ = worker_rss(service)
        body_bytes = {s.key: len(s.body) for s in scenarios}
        rss = (rss_worker, rss_main, rss_after)
        return SizeReport(n, imported, startup_s, *rss, notes, body_bytes, results)
    finally:
        for process in reversed(processes):
            process.stop()
        if not opts.keep:
            with contextlib.suppress(OSError):
                catalog_path.unlink()


# ----------------------------------------------------------------------------------------- report


def _size_table(r: SizeReport, opts: Options) -> list[str]:
    rows = []
    for key, title in SCENARIOS.items():
        for connections in opts.connections:
            cells = {s: r.of(key, connections, s) for s in SERVERS}
            if not cells["service"]:
                continue
            rps = {s: median([x.rps for x in cells[s]]) for s in SERVERS}
            p50 = {s: median([x.p50_ms for x in cells[s]]) for s in SERVERS}
            p99 = {s: median([x.p99_ms for x in cells[s]]) for s in SERVERS}
            errors = {s: median([x.errors for x in cells[s]]) for s in SERVERS}
            rows.append(
                [
                    title,
                    f"{r.body_bytes.get(key, 0):,}",
                    connections,
                    *(fmt_rps(rps[s]) for s in SERVERS),
                    *(fmt_ratio(div(rps["service"], rps[s])) for s in FLOORS),
                    fmt_ratio(div(rps["rsgi"], rps["nginx"])),
                    " / ".join(fmt_ms(p50[s]) for s in SERVERS),
                    " / ".join(fmt_ms(p99[s]) for s in SERVERS),
                    " / ".join(fmt_ratio(div(p99["service"], p99[s])) for s in FLOORS),
                    " / ".join(f"{errors[s]:g}" for s in SERVERS),
                ]
            )
    every, floors = " / ".join(TITLES[s] for s in SERVERS), " / ".join(TITLES[s] for s in FLOORS)
    columns = ["scenario", "body B", "conns", *(f"req/s {TITLES[s]}" for s in SERVERS)]
    columns += [*(f"svc÷{TITLES[s]}" for s in FLOORS), "RSGI÷nginx"]
    columns += [f"p50 ms {every}", f"p99 ms {every}", f"p99 svc÷ {floors}", f"errors {every}"]
    return table(columns, rows, "lrr" + "r" * (len(SERVERS) + len(FLOORS) + 1) + "llll")


def _scale_table(reports: list[SizeReport], opts: Options) -> list[str]:
    reference = next((r for r in reports if r.n == 1000), reports[0])

    def rps_of(report: SizeReport, connections: int, server: str) -> float:
        return median([x.rps for x in report.of("filtered", connections, server)])

    rows = []
    for r in reports:
        for connections in opts.connections:
            rps = rps_of(r, connections, "service")
            ratio = div(rps, rps_of(reference, connections, "service"))
            drifts = [div(rps_of(r, connections, s), rps_of(reference, connections, s)) for s in FLOORS]
            p99 = median([x.p99_ms for x in r.of("filtered", connections, "service")])
            rows.append(
                [
                    f"{r.n:,}",
                    connections,
                    fmt_rps(rps),
                    fmt_ratio(ratio),
                    *(fmt_ratio(div(ratio, drift)) for drift in drifts),
                    fmt_ms(p99),
                ]
            )
    return [
        "",
        f"## Scale check: filtered list req/s (service) relative to N = {reference.n:,}",
        "",
        "The answer is the same at every N. `ratio` compares raw req/s, which also moves with the"
        " machine's load between the N phases; `ratio ÷ X ratio` divides out floor X's drift over the"
        " same phases (it is (svc÷X at N) ÷ (svc÷X at the reference)).",
        "",
        *table(
            ["N", "conns", "req/s", "ratio", *(f"ratio ÷ {TITLES[s]} ratio" for s in FLOORS), "p99 ms"],
            rows,
            "r" * (len(FLOORS) + 5),
        ),
    ]


def render_report(reports: list[SizeReport], opts: Options, cores: Cores, versions: dict[str, str]) -> str:
    columns = ["N", *Imported.COLUMNS, "serve start-up s", "worker RSS MiB (after load)", "main RSS MiB"]
    rows = [
        [
            f"{r.n:,}",
            *r.imported.cells(),
            f"{r.startup_s:.1f}",
            f"{mib(r.rss_worker_kib)} ({mib(r.rss_after_kib)})",
            mib(r.rss_main_kib),
        ]
        for r in reports
    ]
    lines = [
        "# cluster-engine read-path benchmark",
        "",
        f"- store: {opts.store}; rounds: {opts.rounds}; wrk runs of {opts.duration}s, `-t1`,"
        f" connections {', '.join(map(str, opts.connections))}; medians over rounds (servers alternated)",
        f"- {versions.get('source', 'src at ?')}; service configuration:"
        f" {harness.service_config(opts.service_env)}",
        f"- {cores.description}; {versions.get('granian', '?')}, loop {versions.get('loop', '?')};"
        f" {versions.get('wrk', '?')}; {versions.get('nginx', '?')}",
        "- floors: raw ASGI and raw RSGI apps (bench/baseline_app.py) on the service's Granian setup"
        " returning its precomputed bytes, differing only in the interface; nginx: one worker, the same"
        " bytes as static files (304 via `return 304`)",
        "",
        "## Import, start-up and memory",
        "",
        *table(columns, rows, "rrrrlrrr"),
    ]
    for r in reports:
        lines += ["", f"## N = {r.n:,}", "", *(f"- {note}" for note in r.notes), "", *_size_table(r, opts)]
    if reports:
        lines += _scale_table(reports, opts)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = harness.parser(__doc__, [1000, 100_000], N_PUBLIC)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds; medians are reported")
    parser.add_argument("--connections", type=int_list, default=[16, 64], help="wrk connection counts")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N=1000, 2 s, 1 round, 64 connections"
    )
    parser.add_argument(
        "--service-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="put KEY=VALUE in the service's environment only (repeatable), e.g. CE_SERVER_INTERFACE=rsgi",
    )
    args = parser.parse_args(argv)
    args.service_env = dict(args.service_env)
    if set(args.service_env) & SET_BY_BENCH:
        parser.error(f"--service-env cannot set {', '.join(sorted(SET_BY_BENCH))}: the harness sets them")
    if args.quick:
        args.sizes, args.duration, args.rounds, args.connections = [1000], 2, 1, [64]
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    if any(n <= N_PUBLIC for n in args.sizes):
        parser.error(f"every size must exceed the {N_PUBLIC} fixed Public images")
    return Options(**vars(args))


def _env_pair(text: str) -> tuple[str, str]:
    """argparse type: ``KEY=VALUE`` (the value may be empty, the key not)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not key.replace("_", "a").isalnum():
        raise argparse.ArgumentTypeError(f"KEY=VALUE with a key of letters, digits and _, got {text!r}")
    return key, value


def _log_size(n: int, report: SizeReport) -> None:
    log(
        f"N={n}: import {report.imported.seconds:.1f}s, worker RSS {mib(report.rss_worker_kib)} MiB"
        f" ({mib(report.rss_after_kib)} MiB after the benchmark)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    found_versions = harness.versions()  # at the start: src/ may change while the benchmark runs
    return harness.run_sizes(
        "ce-bench-",
        opts,
        lambda n, cores, store, workdir: bench_size(n, opts, cores, store, workdir),
        lambda reports, cores: render_report(reports, opts, cores, found_versions),
        _log_size,
    )
