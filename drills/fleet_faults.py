"""The fleet drill's faults, injected one after another while the writes (about 10/s) and the steady reads
(about 20/s) go on, each followed by an admin write whose propagation to every replica is timed.

A fault is an object with a ``name`` and an ``inject(fleet)`` that runs in a thread of its own (the event
loop keeps sending meanwhile), does the damage, undoes it, and returns a ``Record``: when it began, when
it was undone, which answers it excuses (and for how long after it was undone), its own figures and
failures. Every answer that is not 2xx is reported by cause; the drill fails on those no fault excuses.
A fault that holds (``StandbyReplayPaused``) also has an ``undo(fleet, record)``: the drill times an admin
write's propagation while the fault holds, then undoes it. Adding a fault is one more class here and one
more entry in the topology's list of faults.

- ``PgBouncerRestart``: PgBouncer stopped (SIGTERM: immediate shutdown, every client and server connection
  cut) and, ``GAP`` s later, started again on the same port. Excused: 503s with the contract's body and a
  Retry-After from the stop until ``RECOVERY_LIMIT`` s after PgBouncer accepts connections again; the
  service promises nothing else (no 500, no other body, no hanging request).
- ``StandbyReplayPaused``: the hot standby that some replicas read from (``CE_DATABASE_READ_URL``) stops
  replaying WAL (``pg_wal_replay_pause()``) for at least ``PAUSE`` s, during which an admin write's
  propagation is timed, then resumes. Excused: nothing. The standby never makes the service answer 503:
  while it stays behind the primary's revision, those replicas read from the primary, so every answer is
  2xx and the write is served by every replica within the freshness bound. Its figures: the primary's
  transactions/s while paused against those just before, and how long the standby took to catch up.
- ``ReplicaKill``: one replica's whole process group (supervisor and workers) SIGKILLed, taken out of
  service first (as a load balancer's health check would), and started again (on a new port: its old
  one may linger). Excused: no answer from that replica for requests in flight at the kill. The other
  replicas must keep answering 2xx throughout; the restarted one must be ready within ``READY_LIMIT`` s
  and (checked by the propagation that follows) list the newest write within the freshness bound.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cluster_engine.server.pids import pid_alive
from cluster_engine.testing import LiveServer
from cluster_engine.testing.pgbouncer import PgBouncer
from cluster_engine.testing.pgserver import PostgresServer

from .common import worker_pids
from .fleet_traffic import Answer, Traffic

GAP = 1.0  # s PgBouncer stays down
RECOVERY_LIMIT = 5.0  # s after the fault is undone by which every answer must be 2xx again
READY_LIMIT = 60.0  # s for a killed replica to be ready again after its restart
IN_FLIGHT = 35.0  # s before a kill that a request to the killed replica may have been sent (> client timeout)
PAUSE = 3.0  # s the standby's replay stays paused at least (an admin write's propagation is timed meanwhile)
BEFORE = 2.0  # s over which the primary's transactions/s are counted just before the pause


@dataclass
class Fleet:
    """What a fault may act on: the replicas (the list is shared with the drill, and a restarted replica
    replaces its predecessor in it and in ``traffic.targets``), the traffic, PgBouncer if any, the standby
    if any, how to start one replica again (in a thread that outlives it: see ``start_fleet``), and the
    primary's transaction count of the service's database (``Monitor.xacts``)."""

    servers: list[LiveServer]
    traffic: Traffic
    bouncer: PgBouncer | None
    restart: Callable[[int], concurrent.futures.Future[LiveServer]]
    workers: int  # per replica
    standby: PostgresServer | None = None
    primary: PostgresServer | None = None
    xacts: Callable[[], int] | None = None


@dataclass
class Record:
    name: str
    began: float  # monotonic
    undone: float  # monotonic: PgBouncer accepting again, the replica ready again
    excuse_503: bool = False  # 503s with the contract's body, anywhere, until undone + RECOVERY_LIMIT
    excuse_target: str | None = None  # no answer from this replica for requests in flight at ``began``
    figures: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    recovered: float | None = None  # s from ``undone`` to the end of the last non-2xx answer it excused

    def excuses(self, answer: Answer) -> bool:
        if self.excuse_503 and answer.contract_503:
            return self.began <= answer.at + answer.latency and answer.at <= self.undone + RECOVERY_LIMIT
        if self.excuse_target is not None and answer.status == 0 and answer.target == self.excuse_target:
            return self.began - IN_FLIGHT <= answer.at <= self.began + 1.0
        return False


class Fault(Protocol):
    name: str

    def inject(self, fleet: Fleet) -> Record: ...


class PgBouncerRestart:
    name = "PgBouncer restarted"

    def inject(self, fleet: Fleet) -> Record:
        bouncer = fleet.bouncer
        assert bouncer is not None, "PgBouncerRestart needs the PgBouncer topology"
        began = time.monotonic()
        bouncer.stop()
        stopped = time.monotonic()
        time.sleep(GAP)
        bouncer.start_again()
        undone = time.monotonic()
        record = Record(self.name, began, undone, excuse_503=True)
        record.figures["outage"] = (
            f"stopped in {(stopped - began) * 1000:.0f} ms, down {undone - stopped:.1f} s "
            f"(port {bouncer.port} again)"
        )
        return record


class StandbyReplayPaused:
    name = "the standby's replay paused and resumed"

    def __init__(self) -> None:
        self.rate_before = 0.0  # the primary's transactions/s just before the pause
        self.paused = 0.0  # monotonic: replay paused
        self.xacts_paused = 0  # the primary's transaction count then

    def inject(self, fleet: Fleet) -> Record:
        standby, xacts = fleet.standby, fleet.xacts
        assert standby is not None and xacts is not None, "StandbyReplayPaused needs the standby topology"
        before = xacts()
        time.sleep(BEFORE)
        self.rate_before = (xacts() - before) / BEFORE
        began = time.monotonic()
        standby.pause_replay()
        self.paused, self.xacts_paused = time.monotonic(), xacts()
        record = Record(self.name, began, began)
        record.figures["pause"] = (
            f"in effect {(self.paused - began) * 1000:.0f} ms after pg_wal_replay_pause()"
        )
        return record

    def undo(self, fleet: Fleet, record: Record) -> None:
        """Resume replay (once it has been paused ``PAUSE`` s) and wait until the standby has applied
        everything the primary had written by then."""
        standby, primary, xacts = fleet.standby, fleet.primary, fleet.xacts
        assert standby is not None and primary is not None and xacts is not None
        time.sleep(max(0.0, self.paused + PAUSE - time.monotonic()))
        paused_rate = (xacts() - self.xacts_paused) / (time.monotonic() - self.paused)
        resumed = time.monotonic()
        standby.resume_replay()
        try:
            standby.wait_replayed(primary, timeout=30)
        except Exception as exc:
            record.failures.append(f"the standby did not catch up: {type(exc).__name__}: {exc}")
        caught_up = time.monotonic()
        record.undone = resumed
        record.figures["held"] = (
            f"{resumed - self.paused:.1f} s; the primary's transactions/s: {self.rate_before:.0f} just "
            f"before, {paused_rate:.0f} while paused (the standby's readers fell back to it)"
        )
        record.figures["resume"] = (
            f"caught up (replayed all the primary had written) {(caught_up - resumed) * 1000:.0f} ms after "
            "pg_wal_replay_resume()"
        )


class ReplicaKill:
    name = "one replica killed and restarted"

    def __init__(self, index: int = -1) -> None:
        self.index = index

    def inject(self, fleet: Fleet) -> Record:
        index = self.index % len(fleet.servers)
        victim = fleet.servers[index]
        pids = [victim.process.pid, *worker_pids(victim)]
        fleet.traffic.down.add(victim.url)  # out of the balancer first, as its health check would
        time.sleep(0.2)  # requests already chosen for it are sent
        began = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) and not _zombie(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        dead = time.monotonic()
        record = Record(self.name, began, began, excuse_target=victim.url)
        survivors = [p for p in pids if pid_alive(p) and not _zombie(p)]
        if survivors:
            record.failures.append(f"{len(survivors)} processes of the killed replica still alive")
        try:
            server = fleet.restart(index).result(timeout=READY_LIMIT + 30)
        except Exception as exc:
            record.undone = time.monotonic()
            record.failures.append(f"the killed replica did not start again: {type(exc).__name__}: {exc}")
            return record
        ready = time.monotonic()
        while server.log().count("Started worker-") < fleet.workers and time.monotonic() < ready + 30:
            time.sleep(0.05)
        workers = time.monotonic()
        record.undone = ready
        fleet.servers[index] = server
        fleet.traffic.targets[fleet.traffic.targets.index(victim.url)] = server.url
        fleet.traffic.down.discard(victim.url)
        record.figures["kill"] = (
            f"replica {index}'s {len(pids)} processes gone {(dead - began) * 1000:.0f} ms after SIGKILL; "
            f"restarted: /readyz 200 after {ready - dead:.1f} s, all {fleet.workers} workers after "
            f"{workers - dead:.1f} s"
        )
        if ready - dead > READY_LIMIT:
            record.failures.append(f"the killed replica took {ready - dead:.1f} s (> {READY_LIMIT:.0f} s)")
        return record


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def judge(records: list[Record], answers: list[Answer]) -> tuple[dict[str, int], dict[str, int]]:
    """Every non-2xx (or wrong) answer by cause, split into those a fault excuses (the cause prefixed by
    the fault's name) and the others; each record's ``recovered`` is set from the answers it excused."""
    excused: dict[str, int] = {}
    other: dict[str, int] = {}
    for answer in answers:
        why = answer.cause or (answer.problem and f"{answer.phase} list 200: {answer.problem}")
        if not why:
            continue
        record = next((r for r in records if answer.problem is None and r.excuses(answer)), None)
        if record is None:
            other[why] = other.get(why, 0) + 1
            continue
        key = f"{record.name}: {why}"
        excused[key] = excused.get(key, 0) + 1
        end = answer.at + answer.latency - record.undone
        record.recovered = max(record.recovered or 0.0, end)
    return excused, other
