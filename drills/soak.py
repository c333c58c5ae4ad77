"""Soak: mixed load (95% lists with varied filters and orgs, 5% writes) at about 70% of the measured
capacity, for 10 minutes, against 2 workers on PostgreSQL.

Capacity is measured first (closed loop, 32 connections); the soak then runs paced at 0.7x that rate while
a thread samples every worker's RSS and open file descriptors. The first minute is warm-up.

Fails on: any answer outside the contract; a worker whose RSS grew by 10% or more from the first minute
after warm-up to the last minute (median of the samples in each); file descriptors growing steadily
(a worker's maximum in the last minute above its maximum in the first minute after warm-up by more than
``FD_SLACK``); a worker replaced during the run; any acknowledged write missing or half-written.
The short version (about 45 s) computes growth over its 30-second window but asserts neither it nor the
descriptor rule: 15 seconds say little about a leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import table

from .common import (
    Load,
    Outcome,
    Report,
    check_answers,
    median,
    percentile,
    summarize,
    verify_ledger,
    windows,
)
from .pgservice import WORKERS, Capacity, Sample, Sampler, measure_capacity, merge_ledgers, pg_service

NAME = "soak"
TITLE = "Soak: 10 minutes of mixed load at 70% of capacity (2 workers, PostgreSQL)"

LOAD_SHARE = 0.7
CAPACITY_CONCURRENCY = 32
SOAK_CONCURRENCY = 64  # enough connections that a slow answer doesn't hold the paced rate back
RSS_GROWTH_LIMIT = 10.0  # percent
FD_SLACK = 10


def _ok(o: Outcome) -> bool:
    return o.problem is None and 200 <= o.status < 300


def _in(samples: list[Sample], low: float, high: float) -> list[Sample]:
    return [s for s in samples if low <= s.at < high]


def _rss(samples: list[Sample], pid: int) -> list[float]:
    return [value for s in samples if (value := s.rss.get(pid)) is not None]


def _fds(samples: list[Sample], pid: int) -> list[int]:
    return [value for s in samples if (value := s.fds.get(pid)) is not None]


@dataclass
class Soak:
    """What the soak measured: the capacity probe, the soak's load, the workers' samples, the log's tail."""

    short: bool
    capacity: Capacity
    target: float
    load: Load
    pids: list[int]
    samples: list[Sample]
    log_tail: str
    duration: float = field(init=False)
    warmup: float = field(init=False)
    width: float = field(init=False)  # rows of the table
    window: float = field(init=False)  # first-after-warm-up and last windows compared

    def __post_init__(self) -> None:
        self.duration, self.warmup, self.width = _timings(self.short)
        self.window = min(60.0, (self.duration - self.warmup) / 2)

    @property
    def first(self) -> list[Sample]:
        return _in(self.samples, self.warmup, self.warmup + self.window)

    @property
    def last(self) -> list[Sample]:
        return _in(self.samples, self.duration - self.window, self.duration + 1)


def _timings(short: bool) -> tuple[float, float, float]:
    """(duration, warm-up, table row width) in seconds."""
    return (30.0, 15.0, 15.0) if short else (600.0, 60.0, 60.0)


def run(workdir: Path, *, short: bool) -> Report:
    report = Report()
    soak = _measure(workdir, short, report)
    growth, worst = _rss_growth(soak)
    fd_steady = _fd_steady(soak)
    _report(soak, growth, fd_steady, report)
    check_answers(soak.capacity.load.outcomes, report, "capacity phase")
    check_answers(soak.load.outcomes, report, "soak")
    pids = soak.pids
    report.check(
        len(pids) == WORKERS, f"{len(pids)} worker processes seen, expected {WORKERS}: a worker was replaced"
    )
    if not short:
        report.check(
            worst < RSS_GROWTH_LIMIT, f"RSS grew by {worst:.1f}% after warm-up (limit {RSS_GROWTH_LIMIT}%)"
        )
        report.check(not fd_steady, f"open file descriptors grew steadily: {', '.join(fd_steady)}")
    if report.failures:
        report.details += ["Server log (tail):", "", "```", soak.log_tail, "```", ""]
    unit = "minute" if soak.width == 60 else f"{soak.width:.0f} s"
    report.details += [
        f"Per {unit} (RSS: last sample in the window, MiB; fds: maximum in the window):",
        "",
        *_window_table(soak.load.outcomes, soak.samples, pids, soak.width, soak.warmup),
    ]
    # The table is long-run evidence; `--no-docs` runs would otherwise never show it.
    print("\n".join(line for line in report.details if line.startswith(("Per ", "|"))), flush=True)
    return report


def _measure(workdir: Path, short: bool, report: Report) -> Soak:
    """Capacity first (closed loop), then the paced soak while a thread samples the workers; the ledger
    of both loads verified against the database at the end."""
    duration, _, _ = _timings(short)
    with pg_service(workdir) as service:
        capacity = measure_capacity(service, 5.0 if short else 10.0, CAPACITY_CONCURRENCY)
        target = round(LOAD_SHARE * capacity.rate, 1)
        load = service.load(concurrency=SOAK_CONCURRENCY, rate=target)
        with Sampler(service.server, load, every=2.0 if short else 5.0) as sampler:
            load.run(duration)
        verify_ledger(service.database_url, merge_ledgers([capacity.load.ledger, load.ledger]), report)
        log_tail = service.server.log()[-2000:]
    return Soak(short, capacity, target, load, sampler.pids_seen, sampler.samples, log_tail)


def _rss_growth(soak: Soak) -> tuple[dict[str, str], float]:
    """Per worker, the median RSS of the first window after warm-up against the last; the worst growth."""
    growth: dict[str, str] = {}
    worst = 0.0
    for n, pid in enumerate(soak.pids, 1):
        before, after = _rss(soak.first, pid), _rss(soak.last, pid)
        if not before or not after:
            growth[f"worker {n}"] = "not enough samples"
            continue
        b, a = median(before), median(after)
        percent = (a - b) / b * 100
        worst = max(worst, percent)
        growth[f"worker {n}"] = f"{percent:+.1f}% ({b:.1f} → {a:.1f} MiB)"
    return growth, worst


def _fd_steady(soak: Soak) -> list[str]:
    """The workers whose open descriptors' floor rose by more than ``FD_SLACK``. Connections come and go
    with the load (client sockets, the database pool's overflow), so the count swings by tens; a leak
    shows as a floor that rises: the windows' minima are compared."""
    steady = []
    for n, pid in enumerate(soak.pids, 1):
        early, late = _fds(soak.first, pid), _fds(soak.last, pid)
        if early and late and min(late) > min(early) + FD_SLACK:
            steady.append(f"worker {n}: {min(early)} → {min(late)}")
    return steady


def _report(soak: Soak, growth: dict[str, str], fd_steady: list[str], report: Report) -> None:
    outcomes, duration, warmup, window = soak.load.outcomes, soak.duration, soak.warmup, soak.window
    overall = summarize(outcomes)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not _ok(o):
            key = o.problem or f"{o.kind} {o.status}"
            errors[key[:80]] = errors.get(key[:80], 0) + 1
    asserted = not soak.short
    figures: dict[str, Any] = report.figures
    figures["set-up"] = f"{WORKERS} workers, PostgreSQL (durable), 260 seeded images, 20 orgs"
    figures["capacity (closed loop)"] = soak.capacity.describe()
    figures["target rate"] = (
        f"{soak.target:.0f} req/s ({LOAD_SHARE:.0%} of capacity, {SOAK_CONCURRENCY} connections)"
    )
    figures["achieved rate"] = f"{len(outcomes) / duration:.0f} req/s over {duration:.0f} s"
    figures["requests"] = overall["requests"]
    figures["writes"] = sum(1 for o in outcomes if o.kind != "list")
    figures["answers by status"] = overall["by_status"]
    figures["errors by kind"] = errors or "none"
    figures["latency p50 / p99 / max (ms)"] = (
        f"{overall['p50_ms']} / {overall['p99_ms']} / {overall['max_ms']}"
    )
    figures["capacity phase answers"] = summarize(soak.capacity.load.outcomes)["by_status"]
    figures["RSS growth after warm-up"] = growth
    figures["RSS growth check"] = (
        f"median RSS in [{warmup:.0f} s, {warmup + window:.0f} s) vs [{duration - window:.0f} s, "
        f"{duration:.0f} s]; "
        + (f"asserted < {RSS_GROWTH_LIMIT:.0f}%" if asserted else "computed, not asserted (short run)")
    )
    fd_range: dict[str, str] = {}
    for n, pid in enumerate(soak.pids, 1):
        values = _fds(soak.samples, pid)
        fd_range[f"worker {n}"] = f"{min(values)}-{max(values)}" if values else "no samples"
    figures["open fds (min-max)"] = fd_range
    figures["fd check"] = (
        f"last-window minimum ≤ first-after-warm-up minimum + {FD_SLACK}; "
        + ("asserted" if asserted else "computed, not asserted (short run)")
        + (f"; grew: {', '.join(fd_steady)}" if fd_steady else "")
    )
    figures["worker processes seen"] = len(soak.pids)


def _window_table(
    outcomes: list[Outcome], samples: list[Sample], pids: list[int], width: float, warmup: float
) -> list[str]:
    """A row per window of ``width`` seconds: requests, errors, p50/p99, each worker's RSS and fds."""
    rows = []
    for index, group in windows(outcomes, width):
        in_window = _in(samples, index * width, (index + 1) * width)
        latencies = [o.latency for o in group]
        rss = [_rss(in_window, pid) for pid in pids]
        fds = [_fds(in_window, pid) for pid in pids]
        label = f"{index + 1}" + (" (warm-up)" if (index + 1) * width <= warmup else "")
        rows.append(
            [label, len(group), sum(1 for o in group if not _ok(o))]
            + [f"{percentile(latencies, 0.5) * 1000:.1f}", f"{percentile(latencies, 0.99) * 1000:.1f}"]
            + [f"{values[-1]:.1f}" if values else "-" for values in rss]
            + [str(max(values)) if values else "-" for values in fds]
        )
    names = [f"w{n}" for n in range(1, len(pids) + 1)]
    unit = "minute" if width == 60 else f"{width:.0f} s"
    columns = [unit, "requests", "errors", "p50 ms", "p99 ms", *(f"RSS {w}" for w in names)]
    return table([*columns, *(f"fds {w}" for w in names)], rows)
