"""What every drill shares: a seeded catalog, servers to run, a mixed load that keeps a ledger of what the
service acknowledged, the checks that nothing acknowledged was lost, and the report a drill returns.

A drill module defines ``NAME``, ``TITLE`` and ``run(workdir, short=...) -> Report``; ``python -m drills``
runs them (see drills/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import sqlalchemy as sa

from cluster_engine.server.auth import mint_token
from cluster_engine.server.pids import descendants
from cluster_engine.storage.db import audit_log, images
from cluster_engine.storage.records import image_from_row, image_of_body
from cluster_engine.testing import LiveServer, image_body
from cluster_engine.testing.stores import opened_store

IDCS = ("us-west-1", "us-east-1", "eu-central-1", "ap-southeast-1")
PRODUCTS = ("gpu.h100.8x", "gpu.b200.8x", "gpu.a100.8x", "gpu.l40s.4x", "gpu.h200.8x", "gpu.mi300x.8x")
DRILL_PREFIX = "drill-"  # names of images the load creates; seeded ones never start with it
SCOPE_WRITE = "images:write"


# ------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """What a drill found: figures for the table, and every violated expectation (empty: passed)."""

    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # markdown lines for docs/reliability.md

    def check(self, condition: bool, failure: str) -> None:
        if not condition:
            self.failures.append(failure)

    @property
    def passed(self) -> bool:
        return not self.failures


# ------------------------------------------------------------------------------------------ catalog


def org(index: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"cluster-engine-drill-org-{index}")


def image_entry(index: int, *, owner: uuid.UUID | None) -> dict[str, Any]:
    """A catalog entry (the import format): Public when ``owner`` is None, else that org's Customized."""
    rnd = random.Random(index)
    products = sorted(rnd.sample(PRODUCTS, rnd.randint(1, 3)))
    entry: dict[str, Any] = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cluster-engine-drill-image-{index}")),
        "type": "Public" if owner is None else "Customized",
        "orgId": str(owner or org(0)),
        **create_body(owner or org(0), name=f"seed-{index}", idc=IDCS[index % len(IDCS)]),
        "supportedProducts": products,
    }
    return entry


def seed_catalog(path: Path, *, public: int = 60, orgs: int = 20, per_org: int = 10) -> Path:
    """Write a deterministic catalog file: ``public`` Public images and ``per_org`` Customized images for
    each of ``orgs`` orgs; import it with ``LiveServer.cli("catalog", "import", path)``."""
    entries = [image_entry(i, owner=None) for i in range(public)]
    entries += [
        image_entry(public + o * per_org + k, owner=org(o)) for o in range(orgs) for k in range(per_org)
    ]
    path.write_text(json.dumps(entries))
    return path


def create_body(owner: uuid.UUID, *, name: str, idc: str = "us-west-1") -> dict[str, Any]:
    return image_body(owner, name, idc=idc, path=f"images/{name}.qcow2")


# ------------------------------------------------------------------------------------------- ledger


@dataclass
class Outcome:
    kind: str  # list | create | delete
    started: float  # seconds since the load began
    latency: float  # seconds
    status: int  # 0: no HTTP answer (connection refused, reset, timeout)
    problem: str | None  # None, or why this answer breaks the contract


@dataclass
class Ledger:
    """Every write the load sent, split by what the service answered."""

    created: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> 201 body
    uncertain_names: set[str] = field(default_factory=set)  # creates with no 2xx (may or may not exist)
    deleted: set[str] = field(default_factory=set)  # ids whose DELETE got 204
    uncertain_deletes: set[str] = field(default_factory=set)  # DELETE with no 2xx

    def live(self) -> set[str]:
        """Ids the load created, and has not deleted (or tried to), as far as acknowledgements go."""
        return set(self.created) - self.deleted - self.uncertain_deletes


UNAVAILABLE_REASONS = ("database is unavailable",)


def contract_problem(kind: str, response: httpx.Response) -> str | None:
    """None when the answer is one the contract allows under faults, else what is wrong with it."""
    status = response.status_code
    if kind == "delete" and status == 204:
        return None if not response.content else "delete: 204 with a body"
    try:
        body = response.json()
    except ValueError:
        return f"{kind}: {status} with a body that is not JSON"
    if status == 503:
        if not (isinstance(body, dict) and set(body) == {"reason"} and isinstance(body["reason"], str)):
            return f"{kind}: 503 without the contract's error body: {body!r}"[:300]
        if not response.headers.get("Retry-After"):
            return f"{kind}: 503 without Retry-After"
        return None
    expected = {"list": 200, "create": 201, "delete": 204}[kind]
    if status != expected:
        return f"{kind}: unexpected {status}: {response.text[:200]}"
    if kind == "list" and not isinstance(body, list):
        return "list: 200 whose body is not an array"
    if kind == "create" and not (isinstance(body, dict) and "id" in body):
        return "create: 201 without an image"
    return None


@dataclass
class Load:
    """A mixed load: ``write_share`` of requests are writes (creates, and deletes of earlier creates), the
    rest are lists with varied filters from varied orgs. ``rate`` requests/s in total (open loop, paced),
    or as fast as ``concurrency`` connections allow when ``rate`` is None."""

    targets: Sequence[str]  # base URLs; requests rotate over them
    secret: str
    orgs: int = 20
    concurrency: int = 16
    rate: float | None = None
    write_share: float = 0.05
    timeout: float = 10.0
    seed: int = 1
    outcomes: list[Outcome] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)

    def __post_init__(self) -> None:
        self._readers = [mint_token(self.secret, org(i), ttl=24 * 3600) for i in range(self.orgs)]
        self._writers = [
            mint_token(self.secret, org(i), scopes=[SCOPE_WRITE], ttl=24 * 3600) for i in range(self.orgs)
        ]
        self._own: dict[int, list[str]] = {}  # org index -> acknowledged ids not yet deleted

    def run(self, duration: float) -> None:
        asyncio.run(self._run(duration))

    async def _run(self, duration: float) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=self.timeout) as client:
            start = time.monotonic()
            self._start = start
            end = start + duration
            interval = self.concurrency / self.rate if self.rate else 0.0
            tasks = [
                asyncio.create_task(self._worker(client, worker, end, interval))
                for worker in range(self.concurrency)
            ]
            await asyncio.gather(*tasks)

    async def _worker(self, client: httpx.AsyncClient, worker: int, end: float, interval: float) -> None:
        rnd = random.Random(self.seed * 1000 + worker)
        next_at = time.monotonic() + rnd.random() * interval
        sent = 0
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if interval:
                if next_at > now:
                    await asyncio.sleep(min(next_at - now, end - now))
                    continue
                next_at += interval
            target = self.targets[(worker + sent) % len(self.targets)]
            sent += 1
            if rnd.random() < self.write_share:
                who = rnd.randrange(self.orgs)
                own = self._own.get(who, [])
                if own and rnd.random() < 0.3:
                    await self._delete(client, target, who, own.pop(rnd.randrange(len(own))))
                else:
                    await self._create(client, target, who, rnd)
            else:
                await self._list(client, target, rnd)

    async def _send(self, kind: str, request: Any) -> tuple[httpx.Response | None, Outcome]:
        began = time.monotonic()
        try:
            response: httpx.Response | None = await request
            assert response is not None
            problem = contract_problem(kind, response)
            status = response.status_code
        except httpx.HTTPError as exc:
            response, status, problem = None, 0, f"{kind}: no answer ({type(exc).__name__})"
        outcome = Outcome(kind, began - self._start, time.monotonic() - began, status, problem)
        self.outcomes.append(outcome)
        return response, outcome

    async def _list(self, client: httpx.AsyncClient, target: str, rnd: random.Random) -> None:
        params: dict[str, str] = {}
        if rnd.random() < 0.6:
            params["idc"] = rnd.choice(IDCS)
        if rnd.random() < 0.6:
            params["product"] = rnd.choice(PRODUCTS)
        token = self._readers[rnd.randrange(self.orgs)]
        headers = {"Authorization": f"Bearer {token}"}
        await self._send("list", client.get(f"{target}/v1/images", params=params, headers=headers))

    async def _create(self, client: httpx.AsyncClient, target: str, who: int, rnd: random.Random) -> None:
        name = f"{DRILL_PREFIX}{uuid.UUID(int=rnd.getrandbits(128)).hex[:16]}"
        body = create_body(org(who), name=name, idc=rnd.choice(IDCS))
        headers = {"Authorization": f"Bearer {self._writers[who]}"}
        response, outcome = await self._send(
            "create", client.post(f"{target}/v1/images", json=body, headers=headers)
        )
        if response is not None and outcome.status == 201 and outcome.problem is None:
            image = response.json()
            self.ledger.created[image["id"]] = image
            self._own.setdefault(who, []).append(image["id"])
        else:
            self.ledger.uncertain_names.add(name)

    async def _delete(self, client: httpx.AsyncClient, target: str, who: int, image_id: str) -> None:
        headers = {"Authorization": f"Bearer {self._writers[who]}"}
        _, outcome = await self._send(
            "delete", client.delete(f"{target}/v1/images/{image_id}", headers=headers)
        )
        if outcome.status == 204 and outcome.problem is None:
            self.ledger.deleted.add(image_id)
        else:
            self.ledger.uncertain_deletes.add(image_id)


# ------------------------------------------------------------------------------------------ figures


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts by status and by problem, latency p50/p99/max in ms."""
    latencies = [o.latency for o in outcomes]
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[str(o.status or "no answer")] = by_status.get(str(o.status or "no answer"), 0) + 1
    problems: dict[str, int] = {}
    for o in outcomes:
        if o.problem:
            key = o.problem.split(":", 2)[0] + ": " + o.problem.split(":", 2)[1].strip()[:60]
            problems[key] = problems.get(key, 0) + 1
    return {
        "requests": len(outcomes),
        "by_status": dict(sorted(by_status.items())),
        "problems": problems,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
    }


def windows(outcomes: Sequence[Outcome], width: float) -> Iterator[tuple[int, list[Outcome]]]:
    """Outcomes grouped by the ``width``-second window they started in."""
    grouped: dict[int, list[Outcome]] = {}
    for o in outcomes:
        grouped.setdefault(int(o.started // width), []).append(o)
    yield from sorted(grouped.items())


def recovery_after(outcomes: Sequence[Outcome], fault_at: float, kind: str | None = None) -> float | None:
    """Seconds from ``fault_at`` until the first request (of ``kind``) that started after it succeeded and
    after which every request of that kind succeeded; None if that never happened."""
    relevant = sorted((o for o in outcomes if kind is None or o.kind == kind), key=lambda o: o.started)
    last_failure = None
    for o in relevant:
        if o.started >= fault_at and (o.status >= 500 or o.status == 0):
            last_failure = o
    if last_failure is None:
        return 0.0
    after = [o for o in relevant if o.started > last_failure.started and 200 <= o.status < 300]
    return round(after[0].started - fault_at, 2) if after else None


# ------------------------------------------------------------------------------------------ checks


async def _stored(database_url: str) -> tuple[dict[str, Any], set[str]]:
    """Every image (id -> row) and the ids with a ``create`` audit entry."""
    async with opened_store(database_url) as store:
        async with store.engine.connect() as conn:
            rows = {str(r.id): r for r in (await conn.execute(sa.select(images))).all()}
            audited = {
                str(r.image_id)
                for r in (
                    await conn.execute(sa.select(audit_log.c.image_id).where(audit_log.c.action == "create"))
                ).all()
            }
        return rows, audited


def verify_ledger(database_url: str, ledger: Ledger, report: Report, label: str = "") -> None:
    """Every acknowledged create is stored whole, every acknowledged delete is gone, and no image the load
    wrote is stored without having been asked for, or half-written (missing its audit entry, or its served
    body disagreeing with its columns)."""
    rows, audited = asyncio.run(_stored(database_url))
    prefix = f"{label}: " if label else ""
    expected = ledger.live()
    missing = sorted(i for i in expected if i not in rows)
    resurrected = sorted(i for i in ledger.deleted if i in rows)
    drill_rows = {i: r for i, r in rows.items() if r.name.startswith(DRILL_PREFIX)}
    phantom = sorted(
        i for i, r in drill_rows.items() if i not in ledger.created and r.name not in ledger.uncertain_names
    )
    half = sorted(i for i, r in drill_rows.items() if i not in audited or not body_matches_columns(r))
    changed = sorted(i for i in expected if i in rows and rows[i].name != ledger.created[i]["name"])
    acked_present = len(expected) - len(missing)
    report.figures[f"{prefix}writes acknowledged"] = len(ledger.created) + len(ledger.deleted)
    report.figures[f"{prefix}acknowledged creates found"] = f"{acked_present}/{len(expected)}"
    report.figures[f"{prefix}acknowledged deletes gone"] = (
        f"{len(ledger.deleted) - len(resurrected)}/{len(ledger.deleted)}"
    )
    report.figures[f"{prefix}unacknowledged writes"] = len(ledger.uncertain_names) + len(
        ledger.uncertain_deletes
    )
    report.check(not missing, f"{prefix}{len(missing)} acknowledged creates are missing: {missing[:5]}")
    report.check(
        not resurrected, f"{prefix}{len(resurrected)} acknowledged deletes came back: {resurrected[:5]}"
    )
    report.check(
        not phantom, f"{prefix}{len(phantom)} images stored that no request asked for: {phantom[:5]}"
    )
    report.check(not half, f"{prefix}{len(half)} images stored half-written: {half[:5]}")
    report.check(not changed, f"{prefix}{len(changed)} acknowledged images stored differently: {changed[:5]}")


def body_matches_columns(row: Any) -> bool:
    """The row's stored body (what the service serves) says what its columns say."""
    return bool(msgspec.to_builtins(image_of_body(row.body)) == msgspec.to_builtins(image_from_row(row)))


def check_answers(outcomes: Iterable[Outcome], report: Report, label: str = "") -> None:
    """Every answer was one the contract allows (2xx, or 503 with the error body); none went unanswered."""
    bad = [o for o in outcomes if o.problem]
    prefix = f"{label}: " if label else ""
    kinds: dict[str, int] = {}
    for o in bad:
        kinds[o.problem or ""] = kinds.get(o.problem or "", 0) + 1
    worst = sorted(kinds.items(), key=lambda kv: -kv[1])[:3]
    report.check(not bad, f"{prefix}{len(bad)} answers outside the contract, e.g. {worst}")


# ------------------------------------------------------------------------------------------ processes


def worker_pids(server: LiveServer) -> list[int]:
    """The server's worker processes (granian's children, not the supervisor)."""
    return descendants(server.process.pid)


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def open_fds(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return None


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
