"""Database faults under load: PostgreSQL fast-stop, kill -9, and pauses (SIGSTOP of the postmaster
alone, then of the postmaster and all its children; the full run adds a 20-second pause of everything),
each during the soak's mixed load (at 70% of the measured capacity) against 2 workers.

The contract under faults: every answer is 200/201/204 or the 503 body (``{"reason": ...}`` with
``Retry-After``); the service itself stays up, so a request that gets no HTTP answer at all is a failure.
Per fault: answers by status, answers outside the contract, the longest response, and the time to recover
(lists and writes separately: seconds from the end of the fault, i.e. PostgreSQL accepting connections
again after a restart or SIGCONT, until requests of that kind succeed and keep succeeding). Afterwards
every acknowledged write must be stored whole, every acknowledged delete gone, and no unacknowledged
write half there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import table

from cluster_engine.server.pids import children
from cluster_engine.testing.pgserver import PostgresServer

from .common import Load, Outcome, Report, check_answers, recovery_after, summarize, verify_ledger
from .pgservice import WORKERS, load_started, measure_capacity, merge_ledgers, pg_service

NAME = "faults"
TITLE = "Database faults under load: PostgreSQL fast stop, kill -9, SIGSTOP pause (2 workers)"

LOAD_SHARE = 0.7
CONCURRENCY = 64
CLIENT_TIMEOUT = 30.0  # longer than any fault: a hang shows as its real length, not as a client timeout
SLOW = 2.0  # answers slower than this (s) are listed in the details


def _kill_all(pg: PostgresServer) -> None:
    """SIGKILL of the postmaster and every child at once, as when the database host dies."""
    pg.stop("kill")


@dataclass
class Pause:
    """SIGSTOP, later SIGCONT, of the postmaster alone or of the postmaster and all its children. Every
    PostgreSQL child process calls setsid(), so signalling the postmaster's process group reaches only the
    postmaster: the children are found through /proc instead."""

    everything: bool
    stopped: list[int] = field(default_factory=list)

    def inject(self, pg: PostgresServer) -> None:
        postmaster = pg.postmaster_pid()
        os.kill(postmaster, signal.SIGSTOP)  # first: a stopped postmaster forks no new backends
        self.stopped = [postmaster]
        if self.everything:
            for _ in range(3):  # a fork that was under way shows up on a second look
                for child in sorted(set(children(postmaster)) - set(self.stopped)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGSTOP)
                        self.stopped.append(child)

    def restore(self, pg: PostgresServer) -> None:
        for pid in reversed(self.stopped):  # the backends first, the postmaster last
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def describe(self) -> str:
        return f"{len(self.stopped)} processes"


@dataclass
class Fault:
    name: str
    description: str
    inject: Callable[[PostgresServer], None]
    restore: Callable[[PostgresServer], None]
    note: Callable[[], str] | None = None  # what the fault did, for the figures
    down: float | None = None  # how long the fault lasts, when not the drill's default
    full_only: bool = False  # skipped by the short run


FAULTS = (
    Fault(
        "fast stop",
        "pg_ctl -m fast equivalent (SIGINT to the postmaster), down, then started again",
        lambda pg: pg.stop("fast"),
        lambda pg: pg.start_again(),
    ),
    Fault(
        "kill -9",
        "SIGKILL of the postmaster and every child at once, down, then started again (crash recovery)",
        _kill_all,
        lambda pg: pg.start_again(),
    ),
    Fault(
        "pause postmaster",
        "SIGSTOP of the postmaster only (new connections hang, open ones work), then SIGCONT",
        (postmaster := Pause(everything=False)).inject,
        postmaster.restore,
    ),
    Fault(
        "pause all",
        "SIGSTOP of the postmaster and every child (backends, walwriter, checkpointer...): a frozen "
        "database host; then SIGCONT",
        (everything := Pause(everything=True)).inject,
        everything.restore,
        lambda: f"{len(everything.stopped)} processes stopped",
    ),
    # A stall longer than any timeout in the service shows what bounds a request's wait (if anything).
    Fault(
        "pause all, 20 s",
        "as pause all, for 20 s",
        (long_pause := Pause(everything=True)).inject,
        long_pause.restore,
        lambda: f"{len(long_pause.stopped)} processes stopped",
        down=20.0,
        full_only=True,
    ),
)


@dataclass
class Timeline:
    """When things happened, in seconds since the fault's load began."""

    injected: float = float("nan")  # the fault began
    down: float = float("nan")  # the inject call returned (the server is stopped or paused)
    restoring: float = float("nan")  # restart / SIGCONT issued
    restored: float = float("nan")  # PostgreSQL accepts connections again: the fault's end
    error: str | None = None


@dataclass
class Injector:
    fault: Fault
    pg: PostgresServer
    load: Load
    before: float
    down_for: float
    timeline: Timeline = field(default_factory=Timeline)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"fault-{self.fault.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(120)

    def _run(self) -> None:
        start = load_started(self.load)
        t = self.timeline
        try:
            time.sleep(max(0.0, start + self.before - time.monotonic()))
            t.injected = time.monotonic() - start
            self.fault.inject(self.pg)
            t.down = time.monotonic() - start
            time.sleep(max(0.0, start + t.injected + self.down_for - time.monotonic()))
            t.restoring = time.monotonic() - start
            self.fault.restore(self.pg)
            t.restored = time.monotonic() - start
        except Exception as exc:  # reported as a failure; the drill goes on to clean up
            t.error = f"{type(exc).__name__}: {exc}"[:300]
            for pause in (postmaster, everything, long_pause):
                with contextlib.suppress(Exception):
                    pause.restore(self.pg)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def _recovery(value: float | None) -> str:
    return "never (within the run)" if value is None else f"{value} s"


@dataclass
class FaultRun:
    """One fault's load and timeline, and what they show: when lists and writes recovered, the longest."""

    fault: Fault
    outcomes: list[Outcome]
    t: Timeline

    @property
    def lists(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "list"]

    @property
    def writes(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind != "list"]

    @property
    def list_recovery(self) -> float | None:
        return recovery_after(self.lists, self.t.restored)

    @property
    def write_recovery(self) -> float | None:
        return recovery_after(self.writes, self.t.restored)

    @property
    def longest(self) -> Outcome | None:
        return max(self.outcomes, key=lambda o: o.latency, default=None)

    @property
    def outside_contract(self) -> int:
        return sum(1 for o in self.outcomes if o.problem)


def run(workdir: Path, *, short: bool) -> Report:
    report = Report()
    runs, log = _measure(workdir, short, report)
    for r in runs:
        check_answers(r.outcomes, report, r.fault.name)
        report.check(r.list_recovery is not None, f"{r.fault.name}: lists never recovered")
        report.check(r.write_recovery is not None, f"{r.fault.name}: writes never recovered")
    _report(runs, log, report)
    return report


def _measure(workdir: Path, short: bool, report: Report) -> tuple[list[FaultRun], str]:
    """The load at ``LOAD_SHARE`` of the measured capacity through each fault in turn; the ledger of
    every load verified against the database at the end. Returns the runs and the server's log."""
    before, down_for, after = (2.0, 3.0, 5.0) if short else (10.0, 5.0, 20.0)
    capacity_seconds = 3.0 if short else 10.0
    # start_again (with crash recovery after kill -9) takes a second or so: the load runs that much longer
    restart_allowance = 1.5 if short else 2.0
    figures = report.figures
    runs: list[FaultRun] = []
    with pg_service(workdir) as service:
        capacity = measure_capacity(service, capacity_seconds, warmup=1.0 if short else 2.0)
        rate = round(LOAD_SHARE * capacity.rate, 1)
        figures["set-up"] = (
            f"{WORKERS} workers, PostgreSQL (durable), 260 seeded images; load {rate:.0f} req/s "
            f"({LOAD_SHARE:.0%} of capacity {capacity.rate:.0f} req/s), 95% lists, 5% writes, "
            f"{CONCURRENCY} connections, client timeout {CLIENT_TIMEOUT:.0f} s"
        )
        figures["capacity (closed loop)"] = capacity.describe()
        figures["timing per fault"] = (
            f"{before:.0f} s of load, fault for {down_for:.0f} s (unless said otherwise), then "
            f"{after:.0f} s+ of load; a fault ends when PostgreSQL accepts connections again (restart) "
            "or at SIGCONT"
        )
        loads = [capacity.load]
        for fault in FAULTS:
            if short and fault.full_only:
                continue
            down = fault.down or down_for
            load = service.load(concurrency=CONCURRENCY, rate=rate, timeout=CLIENT_TIMEOUT)
            injector = Injector(fault, service.pg, load, before, down)
            injector.start()
            load.run(before + down + restart_allowance + after)
            injector.join()
            loads.append(load)
            runs.append(FaultRun(fault, load.outcomes, injector.timeline))
            if injector.timeline.error is not None:
                report.failures.append(f"{fault.name}: injecting the fault failed: {injector.timeline.error}")
                break
        service.pg.wait_ready()
        service.server.wait_synced(timeout=10)
        verify_ledger(service.database_url, merge_ledgers([ld.ledger for ld in loads]), report)
        check_answers(capacity.load.outcomes, report, "before the faults")
        return runs, service.server.log()


def _report(runs: list[FaultRun], log: str, report: Report) -> None:
    """Each fault's figures, the table of faults, the slow answers and the server log's warnings."""
    rows = []
    slow_lines: list[str] = []
    for r in runs:
        t, longest = r.t, r.longest
        by_status = summarize(r.outcomes)["by_status"]
        longest_text = (
            f"{_ms(longest.latency)} ms ({longest.kind}, sent {longest.started - t.injected:+.1f} s from "
            f"the fault, answer {longest.status or 'none'})"
            if longest
            else "n/a"
        )
        report.figures[r.fault.name] = {
            "what": r.fault.description,
            "down": f"{t.restored - t.injected:.1f} s (inject took {t.down - t.injected:.2f} s, "
            f"restore {t.restored - t.restoring:.2f} s)",
            **({"did": r.fault.note()} if r.fault.note else {}),
            "requests": len(r.outcomes),
            "answers": by_status,
            "outside contract": r.outside_contract,
            "longest response": longest_text,
            "longest list / write (ms)": f"{_ms(max((o.latency for o in r.lists), default=0))} / "
            f"{_ms(max((o.latency for o in r.writes), default=0))}",
            "lists recover": _recovery(r.list_recovery),
            "writes recover": _recovery(r.write_recovery),
        }
        answers = ", ".join(f"{k}: {v}" for k, v in by_status.items())
        rows.append(
            [
                r.fault.name,
                len(r.outcomes),
                answers,
                r.outside_contract,
                _ms(longest.latency) if longest else "-",
                _recovery(r.list_recovery),
                _recovery(r.write_recovery),
            ]
        )
        slow = sorted((o for o in r.outcomes if o.latency > SLOW), key=lambda o: o.started)
        if slow:
            slow_lines.append(
                f"- {r.fault.name}: {len(slow)} answers slower than {SLOW:.0f} s: " + _slow(slow, t)
            )
    columns = ["fault", "requests", "answers", "outside contract", "longest (ms)", "lists recover"]
    report.details += table([*columns, "writes recover"], rows)
    if slow_lines:
        report.details += [
            "",
            f"Answers slower than {SLOW:.0f} s (sent at, relative to the fault's start):",
            "",
        ]
        report.details += slow_lines
    warnings = [
        line for line in log.splitlines() if "WARNING" in line or "ERROR" in line or "Traceback" in line
    ]
    report.figures["server log warnings"] = len(warnings)
    if report.failures and warnings:
        report.details += ["", "Server log warnings (first 20):", "", "```", *warnings[:20], "```"]


def _slow(slow: list[Outcome], t: Timeline) -> str:
    by_kind: dict[str, list[Outcome]] = {}
    for o in slow:
        by_kind.setdefault(o.kind, []).append(o)
    parts = []
    for kind, group in by_kind.items():
        sent = [o.started - t.injected for o in group]
        parts.append(
            f"{kind} x{len(group)} sent {min(sent):+.1f}…{max(sent):+.1f} s, "
            f"{_ms(min(o.latency for o in group))}-{_ms(max(o.latency for o in group))} ms, "
            f"answers {sorted({o.status for o in group})}"
        )
    return "; ".join(parts)
