"""What ``bench orgs`` measured (a ``Measured`` per scenario run, a ``SizeReport`` per N) and its
Markdown report: the scenarios' medians, the rounds, the hook's cost, and ``restart``'s seconds."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .catalog import N_PUBLIC, ORGS_IMAGES_PER_ORG
from .harness import service_config
from .processes import Cores, Imported
from .report import div, fmt_count, fmt_ms, fmt_ratio, fmt_rps, median, mib, table
from .writer import WriteStats
from .wrk import LuaRun

SCENARIOS = {
    "single": "one org's token",
    "spread": "every org's token in turn",
    "spread_hook": "spread + wrk response() hook",
    "restart": "spread from readiness, no warm-up",
    "spread_writes": "spread + writer",
    "single_writes": "single + writer",
}
ALL_TOKENS = {"spread", "spread_hook", "restart", "spread_writes"}
SETTLED = 0.8  # restart: "settled" once a second's throughput reaches this share of warm spread


@dataclasses.dataclass
class Measured:
    scenario: str
    round: int
    startup_s: float
    run: LuaRun
    rss_after_kib: int | None
    writes: WriteStats | None = None
    ready_at: float = 0.0  # restart: wall-clock time /readyz first answered 200 (as seen by the harness)


@dataclasses.dataclass
class SizeReport:
    n: int
    imported: Imported
    orgs_with: int
    orgs_without: int
    startup_s: float
    rss_idle_kib: int | None
    notes: list[str]
    runs: list[Measured]

    def of(self, scenario: str) -> list[Measured]:
        return [m for m in self.runs if m.scenario == scenario]


def _cpu_cells(runs: Sequence[Measured]) -> list[str]:
    """The worker's CPU share during the run (and its CPU per answer), and wrk's: a worker below 100%
    while wrk is near it means the figure is wrk's limit, not the service's."""
    spans = [m.run.ended - m.run.started for m in runs]
    cpus = [m.run.worker_cpu_s for m in runs]
    worker = median([c / s if c is not None else None for c, s in zip(cpus, spans, strict=True)])
    per_request = median(
        [c * 1e6 / m.run.result.requests if c is not None else None for c, m in zip(cpus, runs, strict=True)]
    )
    wrk = median([m.run.wrk_cpu_s / s for m, s in zip(runs, spans, strict=True)])
    if math.isnan(worker):
        return ["?", f"{wrk * 100:.0f}"]
    return [f"{worker * 100:.0f} ({per_request:.0f})", f"{wrk * 100:.0f}"]


def per_second(m: Measured, seconds: int) -> list[int]:
    """Restart: the requests sent in each second after readiness."""
    return [m.run.buckets.get(s, 0) for s in range(seconds)]


def settled_after(m: Measured, seconds: int, threshold: float) -> int | None:
    """Restart: the end of the first second after readiness whose throughput reached ``threshold``."""
    for second, rate in enumerate(per_second(m, seconds)):
        if rate >= threshold:
            return second + 1
    return None


def _scenario_row(key: str, runs: list[Measured], r: SizeReport, opts: Any, single: float) -> list[str]:
    rps = median([m.run.result.rps for m in runs])
    writes = [m.writes for m in runs if m.writes]
    write_cells = ["-", "-"]
    if writes:
        write_cells = [
            f"{median([w.rate for w in writes]):.1f} ({fmt_count(median([w.failed for w in writes]))})",
            f"{fmt_ms(median([w.p50_ms for w in writes]))} / {fmt_ms(median([w.p99_ms for w in writes]))}",
        ]
    title = SCENARIOS[key] + (f" (first {opts.restart_duration}s)" if key == "restart" else "")
    return [
        f"`{key}`: {title}",
        f"{r.orgs_with + r.orgs_without if key in ALL_TOKENS else 1:,}",
        fmt_rps(rps),
        fmt_ratio(div(rps, single)),
        fmt_ms(median([m.run.result.p50_ms for m in runs])),
        fmt_ms(median([m.run.result.p99_ms for m in runs])),
        fmt_count(median([m.run.result.non2xx for m in runs])),
        fmt_count(median([m.run.result.socket_errors for m in runs])),
        fmt_count(median([m.run.hook_non200 for m in runs])),
        *write_cells,
        f"{median([m.startup_s for m in runs]):.1f}",
        mib(median([m.rss_after_kib for m in runs])),
        *_cpu_cells(runs),
    ]


def _rounds_table(r: SizeReport, rounds: int) -> list[str]:
    rows = []
    for key in SCENARIOS:
        by_round = {m.round: m.run.result for m in r.of(key)}
        if by_round:
            rows.append(
                [f"`{key}`"]
                + [
                    f"{by_round[i].rps:,.0f} ({by_round[i].p99_ms:.1f})" if i in by_round else "-"
                    for i in range(rounds)
                ]
            )
    return [
        "",
        "Per round (the medians above are of these"
        + ("; with 2 rounds a median is their mean):" if rounds == 2 else "):"),
        "",
        *table(
            ["scenario", *(f"round {i + 1} req/s (p99 ms)" for i in range(rounds))], rows, "l" + "r" * rounds
        ),
    ]


def _restart_section(r: SizeReport, seconds: int, spread: float) -> list[str]:
    restarts = sorted(r.of("restart"), key=lambda m: m.round)
    threshold = SETTLED * spread
    series = [per_second(m, seconds) for m in restarts]
    rows = [[f"{second} to {second + 1}", *(f"{s[second]:,}" for s in series)] for second in range(seconds)]
    settled = [settled_after(m, seconds, threshold) for m in restarts]
    described = [f"> {seconds} s" if s is None else f"{s} s" for s in settled]
    delays = [m.run.started - m.ready_at for m in restarts]
    return [
        "",
        f"### N = {r.n:,}: `restart`, answers per second after readiness",
        "",
        "Spread load from the moment `/readyz` answered 200 (no warm-up): requests sent per second"
        " (wrk sends a connection's next request when its answer is complete, so this is the"
        " throughput, shifted by one latency); settled = the end of the first second at"
        f" ≥ {SETTLED:g} of warm `spread` ({fmt_rps(threshold)} req/s).",
        "",
        *table(
            ["second after ready", *(f"round {m.round + 1} req/s" for m in restarts)],
            rows,
            "r" * (1 + len(restarts)),
        ),
        "",
        f"- settled after: {', '.join(described)} (per round)",
        "- per round: non-2xx/3xx "
        + ", ".join(f"{m.run.result.non2xx:,}" for m in restarts)
        + "; socket errors "
        + ", ".join(f"{m.run.result.socket_errors:,}" for m in restarts)
        + "; slowest answer "
        + ", ".join(f"{m.run.result.max_ms:,.0f} ms" for m in restarts)
        + "; p99 "
        + ", ".join(f"{m.run.result.p99_ms:,.1f} ms" for m in restarts),
        f"- wrk launched {', '.join(f'{d * 1000:.0f} ms' for d in delays)} after readiness was seen"
        f" (polled every 0.1 s); timer {restarts[0].run.clock}",
    ]


def _size_section(r: SizeReport, opts: Any) -> list[str]:
    single = median([m.run.result.rps for m in r.of("single")])
    columns = ["scenario", "tokens", "req/s", "÷ single", "p50 ms", "p99 ms", "non-2xx/3xx", "socket errors"]
    columns += ["status ≠ 200 (hook)", "writes/s (failed)", "write p50 / p99 ms", "start-up s"]
    columns += ["worker RSS MiB after", "worker CPU % (µs/req)", "wrk CPU %"]
    rows = [_scenario_row(key, r.of(key), r, opts, single) for key in SCENARIOS if r.of(key)]
    lines = ["", f"## N = {r.n:,}", "", *(f"- {note}" for note in r.notes), ""]
    lines += table(columns, rows, "llrrrrrrrllrrrr")
    if opts.rounds > 1:
        lines += _rounds_table(r, opts.rounds)
    left = sum(m.writes.left for m in r.runs if m.writes)
    if left:
        lines += [
            "",
            f"The writer could not delete {left} of the images it created (they stay in the catalog).",
        ]
    statuses: Counter[int] = Counter()
    for m in r.runs:
        statuses.update(m.run.statuses)
    if statuses:
        seen = ", ".join(f"{status}: {count:,}" for status, count in sorted(statuses.items()))
        lines += ["", f"Statuses ≠ 200 seen by the hook (all rounds): {seen}"]
    spread = median([m.run.result.rps for m in r.of("spread") or r.of("spread_hook")])
    if r.of("spread") and r.of("spread_hook"):
        hooked = median([m.run.result.rps for m in r.of("spread_hook")])
        lines += [
            "",
            f"The response() hook's cost to wrk: `spread_hook` ÷ `spread` = {fmt_ratio(div(hooked, spread))}"
            " (1.00 = no cost; every other scenario runs without it).",
        ]
    if r.of("restart"):
        lines += _restart_section(r, opts.restart_duration, spread)
    return lines


def render_report(reports: list[SizeReport], opts: Any, cores: Cores, versions: dict[str, str]) -> str:
    columns = ["N", Imported.COLUMNS[0], "orgs with / without Customized", *Imported.COLUMNS[1:]]
    rows = [
        [
            f"{r.n:,}",
            r.imported.cells()[0],
            f"{r.orgs_with:,} / {r.orgs_without:,}",
            *r.imported.cells()[1:],
            f"{r.startup_s:.1f}",
            mib(r.rss_idle_kib),
        ]
        for r in reports
    ]
    lines = [
        "# cluster-engine read path with many tokens (python -m bench orgs)",
        "",
        f"- store: {opts.store}; rounds: {opts.rounds} (scenario order rotated);"
        f" wrk `-t1 -c{opts.connections}` with bench/orgs.lua, runs of {opts.duration}s after a"
        f" {opts.warmup}s warm-up of the same load, each scenario on a fresh server; medians over rounds",
        f"- {versions.get('source', 'src at ?')}; service configuration: {service_config()}",
        f"- {cores.description}; {versions.get('granian', '?')}, loop {versions.get('loop', '?')};"
        f" {versions.get('wrk', '?')}",
        f"- catalog: the {N_PUBLIC} Public images of `bench run`, Customized images in orgs of"
        f" {ORGS_IMAGES_PER_ORG}, as many orgs again without any; one HS256 token per org"
        " (PyJWT: orgId, iat, exp); `single` uses the `cluster-engine token` token of one org, through the"
        " same Lua script",
        "",
        "## Import and start-up",
        "",
        *table([*columns, "serve start-up s", "worker RSS MiB idle"], rows, "rrrrrlrr"),
    ]
    for r in reports:
        lines += _size_section(r, opts)
    return "\n".join(lines) + "\n"
