"""Soak: mixed load at about 70% of the measured capacity, for 10 minutes, against 2 workers on PostgreSQL.

Reads come from ``wrk`` (drills/soak.lua, drills/wrkload.py): 40 orgs' tokens (20 with Customized images,
20 without), lists with varied filters (65%), conditional lists that carry the ETag last seen for that
org and query (25%: 304 unless a write changed the answer), gets by id of images the org may see (10%).
Writes stay in Python (``common.Load``, creates and deletes at ``WRITE_RATE``), which keeps the ledger.

Capacity is measured first: wrk closed loop on 64 connections with the writer beside it, counted after a
warm-up. The soak then paces wrk (soak.lua's ``delay()``: one schedule for all connections) at 0.7x that
rate, less the writes, while a thread samples every worker's RSS and open file descriptors. The first
minute is warm-up.

Fails on: any read answered other than 200 (304 for conditional lists), any write other than 201/204 or
outside the contract, any socket error in wrk, more reads unanswered at the end than connections; a
worker whose RSS grew by 10% or more from the first minute after warm-up to the last minute (median of
the samples in each); file descriptors growing steadily (a worker's minimum in the last minute above its
minimum in the first minute after warm-up by more than ``FD_SLACK``); a worker replaced during the run;
an achieved rate under 50% of capacity; any acknowledged write missing or half-written. The short
version (about 45 s) computes growth and the achieved share over its 30-second window but asserts none
of them: 15 seconds say little about a leak, and on a shared
machine the capacity measured a moment earlier may not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import table

from . import wrkload
from .common import Report, check_answers, median, percentile, summarize, verify_ledger, windows
from .pgservice import WORKERS, Sample, merge_ledgers, pg_service
from .soak_load import CONNECTIONS, WRITE_RATE, WRITERS, Phase, mix, run_phase, statuses, write_ok

NAME = "soak"
TITLE = "Soak: 10 minutes of mixed load at 70% of capacity, reads from wrk (2 workers, PostgreSQL)"

LOAD_SHARE = 0.7
MIN_SHARE = 0.5  # of capacity, asserted on the achieved rate (full run)
RSS_GROWTH_LIMIT = 10.0  # percent
FD_SLACK = 10
PUBLIC, PER_ORG = 60, 10  # the seeded catalog (pgservice.pg_service)


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
    capacity: Phase
    target: float
    load: Phase
    pids: list[int]
    samples: list[Sample]
    plan_problems: list[str]
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

    @property
    def achieved(self) -> float:
        return (sum(self.load.reads.by_status().values()) + len(self.load.writes.outcomes)) / self.duration


def _timings(short: bool) -> tuple[float, float, float]:
    """(duration, warm-up, table row width) in seconds."""
    return (30.0, 15.0, 15.0) if short else (600.0, 60.0, 60.0)


def run(workdir: Path, *, short: bool) -> Report:
    report = Report()
    soak = _measure(workdir, short, report)
    growth, worst = _rss_growth(soak)
    fd_steady = _fd_steady(soak)
    _report(soak, growth, fd_steady, report)
    report.check(not soak.plan_problems, f"the plan's answers are wrong: {soak.plan_problems[:3]}")
    for label, phase in (("capacity phase", soak.capacity), ("soak", soak.load)):
        check_answers(phase.writes.outcomes, report, f"{label} writes")
        bad = sum(1 for o in phase.writes.outcomes if not write_ok(o))
        report.check(not bad, f"{label}: {bad} writes not answered 201/204")
        errors, sockets = phase.reads.errors(), phase.reads.result.socket_errors
        report.check(not errors, f"{label}: reads answered outside 200/304: {dict(errors)}")
        report.check(not sockets, f"{label}: {sockets} socket errors in wrk (connect, read, write, timeout)")
        lost = phase.reads.unanswered
        report.check(
            0 <= lost <= CONNECTIONS, f"{label}: {lost} reads sent and not answered (in flight at most)"
        )
    pids = soak.pids
    report.check(
        len(pids) == WORKERS, f"{len(pids)} worker processes seen, expected {WORKERS}: a worker was replaced"
    )
    if not short:
        report.check(
            worst < RSS_GROWTH_LIMIT, f"RSS grew by {worst:.1f}% after warm-up (limit {RSS_GROWTH_LIMIT}%)"
        )
        report.check(not fd_steady, f"open file descriptors grew steadily: {', '.join(fd_steady)}")
        share = soak.achieved / soak.capacity.rate
        report.check(share >= MIN_SHARE, f"achieved {share:.0%} of capacity (at least {MIN_SHARE:.0%})")
    if report.failures:
        report.details += ["Server log (tail):", "", "```", soak.log_tail, "```", ""]
    unit = "minute" if soak.width == 60 else f"{soak.width:.0f} s"
    report.details += [
        f"Per {unit} (reads and their latency by the window they were sent in; RSS: last sample in the "
        "window, MiB; fds: maximum in the window):",
        "",
        *_window_table(soak),
    ]
    # The table is long-run evidence; `--no-docs` runs would otherwise never show it.
    print("\n".join(line for line in report.details if line.startswith(("Per ", "|"))), flush=True)
    return report


def _measure(workdir: Path, short: bool, report: Report) -> Soak:
    """The plan checked, capacity (wrk closed loop, the writer beside it), then the paced soak while a
    thread samples the workers; the writes of both verified against the database at the end."""
    duration, _, width = _timings(short)
    wrkload.wrk_path()  # before anything starts: the drill cannot run without it
    lines = wrkload.plan(orgs=20, public=PUBLIC, per_org=PER_ORG)
    with pg_service(workdir) as service:
        plan_file = wrkload.write_plan(workdir / "plan.tsv", lines, service.server.secret, ttl=24 * 3600)
        problems = wrkload.check_plan(service.server.url, lines, service.server.secret)
        seconds, warmup = (7.0, 2.0) if short else (12.0, 2.0)
        capacity, _ = run_phase(service, plan_file, seconds, 1.0, rate=0.0, counted_from=warmup)
        target = round(LOAD_SHARE * capacity.rate, 1)
        load, sampler = run_phase(
            service,
            plan_file,
            duration,
            width,
            rate=max(1.0, target - WRITE_RATE),
            sample_every=2.0 if short else 5.0,
        )
        verify_ledger(
            service.database_url, merge_ledgers([capacity.writes.ledger, load.writes.ledger]), report
        )
        log_tail = _tail(service.server.log_path)
    assert sampler is not None
    return Soak(short, capacity, target, load, sampler.pids_seen, sampler.samples, problems, log_tail)


def _tail(path: Path, size: int = 2000) -> str:
    """The end of a log that may be large (the access log of millions of requests)."""
    with path.open("rb") as log:
        log.seek(0, 2)
        log.seek(max(0, log.tell() - size))
        return log.read().decode(errors="replace")


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
    duration, warmup, window = soak.duration, soak.warmup, soak.window
    load, capacity = soak.load, soak.capacity
    wrk = load.reads.result
    asserted = not soak.short
    figures: dict[str, Any] = report.figures
    figures["set-up"] = f"{WORKERS} workers, PostgreSQL (durable), 260 seeded images, 20 orgs"
    figures["load generators"] = (
        f"reads: wrk -t1 -c{CONNECTIONS} with drills/soak.lua, {wrkload.READER_ORGS} orgs' tokens, "
        f"{wrkload.mix_text()}; writes: Python (httpx, {WRITERS} connections) at {WRITE_RATE:g}/s, "
        "creates and deletes of earlier creates"
    )
    measured = capacity.seconds - capacity.counted_from
    figures["capacity (closed loop)"] = (
        f"{capacity.rate:.0f} req/s ({CONNECTIONS} connections, {measured:.0f} s "
        f"after a {capacity.counted_from:.0f} s warm-up; CPU: {capacity.cpu_text()})"
    )
    figures["target rate"] = (
        f"{soak.target:.0f} req/s ({LOAD_SHARE:.0%} of capacity): reads paced at "
        f"{soak.target - WRITE_RATE:.0f}/s, writes at {WRITE_RATE:g}/s"
    )
    figures["achieved rate"] = (
        f"{soak.achieved:.0f} req/s over {duration:.0f} s, {soak.achieved / capacity.rate:.0%} of capacity"
        + ("" if asserted else " (not asserted: short run)")
    )
    figures["mix (answers)"] = mix(load)
    figures["answers by status"] = statuses(load)
    errors = dict(load.reads.errors())
    errors.update(
        {
            f"write {k}": v
            for k, v in summarize([o for o in load.writes.outcomes if not write_ok(o)])["by_status"].items()
        }
    )
    figures["errors by status"] = errors or "none"
    figures["wrk socket errors"] = wrk.socket_errors
    figures["reads in flight at the end (sent, not answered)"] = load.reads.unanswered
    reads = load.reads
    figures["reads: latency p50 / p99 / max (ms)"] = (
        f"measured (every answer, soak.lua): {reads.latency_ms(0.5):.2f} / {reads.latency_ms(0.99):.2f}"
        f" / {wrk.max_ms:.1f}; wrk's summary (with its coordinated-omission correction): "
        f"{wrk.p50_ms:.2f} / {wrk.p99_ms:.2f} / {wrk.max_ms:.1f}"
    )
    writes = summarize(load.writes.outcomes)
    figures["writes: latency p50 / p99 / max (ms)"] = (
        f"{writes['p50_ms']} / {writes['p99_ms']} / {writes['max_ms']}"
    )
    figures["CPU during the soak"] = load.cpu_text()
    figures["capacity phase answers"] = statuses(capacity)
    figures["RSS growth after warm-up"] = growth
    figures["RSS growth check"] = (
        f"median RSS in [{warmup:.0f} s, {warmup + window:.0f} s) vs [{duration - window:.0f} s, "
        f"{duration:.0f} s]; "
        + (f"asserted < {RSS_GROWTH_LIMIT:.0f}%" if asserted else "computed, not asserted (short run)")
    )
    fd_range: dict[str, str] = {}
    rss_range: dict[str, str] = {}
    for n, pid in enumerate(soak.pids, 1):
        values = _fds(soak.samples, pid)
        fd_range[f"worker {n}"] = f"{min(values)}-{max(values)}" if values else "no samples"
        rss = _rss(soak.samples, pid)
        rss_range[f"worker {n}"] = f"{min(rss):.1f}-{max(rss):.1f}" if rss else "no samples"
    figures["RSS (MiB, min-max)"] = rss_range
    figures["open fds (min-max)"] = fd_range
    figures["fd check"] = (
        f"last-window minimum ≤ first-after-warm-up minimum + {FD_SLACK}; "
        + ("asserted" if asserted else "computed, not asserted (short run)")
        + (f"; grew: {', '.join(fd_steady)}" if fd_steady else "")
    )
    figures["worker processes seen"] = len(soak.pids)


def _window_table(soak: Soak) -> list[str]:
    """A row per window: reads and writes sent, errors, read p50/p99, each worker's RSS and fds."""
    reads, width, pids = soak.load.reads, soak.width, soak.pids
    writes = dict(windows(soak.load.writes.outcomes, width))
    rows = []
    for index in sorted(set(reads.sent) | set(writes)):
        if index < 0 or index * width >= soak.duration:
            continue
        in_window = _in(soak.samples, index * width, (index + 1) * width)
        group = writes.get(index, [])
        errors = sum(reads.errors({index}).values()) + sum(1 for o in group if not write_ok(o))
        rss = [_rss(in_window, pid) for pid in pids]
        fds = [_fds(in_window, pid) for pid in pids]
        label = f"{index + 1}" + (" (warm-up)" if (index + 1) * width <= soak.warmup else "")
        latencies = [o.latency for o in group]
        rows.append(
            [label, reads.sent.get(index, 0), len(group), errors]
            + [f"{reads.latency_ms(0.5, index):.1f}", f"{reads.latency_ms(0.99, index):.1f}"]
            + [f"{percentile(latencies, 0.99) * 1000:.1f}" if latencies else "-"]
            + [f"{values[-1]:.1f}" if values else "-" for values in rss]
            + [str(max(values)) if values else "-" for values in fds]
        )
    names = [f"w{n}" for n in range(1, len(pids) + 1)]
    unit = "minute" if width == 60 else f"{width:.0f} s"
    columns = [unit, "reads", "writes", "errors", "read p50 ms", "read p99 ms", "write p99 ms"]
    return table([*columns, *(f"RSS {w}" for w in names), *(f"fds {w}" for w in names)], rows)
