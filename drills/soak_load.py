"""One phase of the soak: wrk with drills/soak.lua (closed loop or paced) and the Python writer beside it,
started together, and who used the CPU meanwhile; with the phase's answers by status and its mix."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import wrkload
from .common import Load, Outcome, summarize, worker_pids
from .pgservice import WORKERS, Sampler, Service, cpu_seconds, load_started
from .wrkload import WrkRun

CONNECTIONS = 64
WRITE_RATE = 13.0  # writes/s: the rate of the soak's writes when they were 5% of a Python-generated load
WRITERS = 8  # the writer's connections


def write_ok(o: Outcome) -> bool:
    return o.problem is None and o.status in (201, 204)


@dataclass
class Phase:
    """One wrk run with the Python writer beside it, and who used the CPU meanwhile (shares of a core)."""

    reads: WrkRun
    writes: Load
    seconds: float
    counted_from: float  # seconds: answers to requests sent earlier are warm-up
    workers_cpu: float
    drill_cpu: float  # this process: the writer and the sampler
    width: float  # of the reads' windows (seconds)

    @property
    def rate(self) -> float:
        """Answers per second to requests sent from ``counted_from`` to the end: reads and writes."""
        low, high = self.counted_from, self.seconds
        counted = [c for w, c in self.reads.answers.items() if low <= w * self.width < high]
        reads = sum(sum(c.values()) for c in counted)
        writes = sum(1 for o in self.writes.outcomes if o.started >= self.counted_from)
        return (reads + writes) / (self.seconds - self.counted_from)

    def cpu_text(self) -> str:
        wrk = self.reads.cpu_seconds / self.reads.seconds
        return (
            f"wrk {wrk:.0%} of a core, the {WORKERS} workers {self.workers_cpu:.0%} together, "
            f"drill (writer, sampler) {self.drill_cpu:.0%}"
        )


def run_phase(
    service: Service,
    plan_file: Path,
    seconds: float,
    width: float,
    *,
    rate: float,
    counted_from: float = 0.0,
    sample_every: float | None = None,
) -> tuple[Phase, Sampler | None]:
    """wrk (paced at ``rate`` reads/s, or closed loop at 0) and the writer for ``seconds``, started
    together; windows of ``width`` seconds count from the writer's start."""
    writes = service.load(concurrency=WRITERS, rate=WRITE_RATE, write_share=1.0)
    writer = threading.Thread(target=writes.run, args=(seconds,), name="writer", daemon=True)
    pids = worker_pids(service.server)
    workers0, drill0, began = sum(map(cpu_seconds, pids)), time.process_time(), time.monotonic()
    writer.start()
    start = load_started(writes)
    t0 = time.time() - (
        time.monotonic() - start
    )  # the writer's start on the wall clock, as soak.lua reads it
    wrk = wrkload.Wrk(service.server.url, plan_file, int(seconds), t0, width, rate, CONNECTIONS)
    sampler = Sampler(service.server, writes, every=sample_every) if sample_every else None
    try:
        wrk.start()
        with sampler or contextlib.nullcontext():
            reads = wrk.finish()
            writer.join(30)
    finally:
        wrk.stop()
    if writer.is_alive():
        raise RuntimeError("the writer did not finish")
    elapsed = time.monotonic() - began
    workers_cpu = (sum(map(cpu_seconds, pids)) - workers0) / elapsed
    drill_cpu = (time.process_time() - drill0) / elapsed
    phase = Phase(reads, writes, seconds, counted_from, workers_cpu, drill_cpu, width)
    return phase, sampler


def statuses(phase: Phase) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, n in sorted(phase.reads.by_status().items()):
        kind, _, status = key.partition(" ")
        counts[f"{wrkload.KINDS.get(kind, kind)} {status}"] = n
    for key, n in summarize(phase.writes.outcomes)["by_status"].items():
        counts[f"write {key}"] = n
    return counts


def mix(phase: Phase) -> str:
    kinds = phase.reads.by_kind()
    writes = phase.writes.outcomes
    total = sum(kinds.values()) + len(writes)
    if not total:
        return "no answers"
    order = [*wrkload.KINDS, *sorted(set(kinds) - set(wrkload.KINDS))]
    parts = [f"{wrkload.KINDS.get(k, k)} {kinds[k]} ({kinds[k] / total:.1%})" for k in order if k in kinds]
    creates = sum(1 for o in writes if o.kind == "create")
    parts.append(
        f"writes {len(writes)} ({len(writes) / total:.2%}: {creates} creates, "
        f"{len(writes) - creates} deletes)"
    )
    return ", ".join(parts)
