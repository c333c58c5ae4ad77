"""What the fleet drill sends (cold bursts, paced writes, steady reads, an admin write's propagation) and
every answer it got, with the time it was sent and the replica it went to, so that the faults can tell the
answers they excuse from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from cluster_engine.server.auth import SCOPE_ADMIN, mint_token

from .common import DRILL_PREFIX, IDCS, SCOPE_WRITE, Ledger, create_body, org

ORGS = 30  # seeded orgs that own Customized images
NEW_ORGS = 200  # orgs of the full cold burst, each asking every replica
WRITE_RATE = 10.0  # writes/s during the measured phase
READ_RATE = 20.0  # steady reads/s (besides the bursts), over every replica in service
PROPAGATION_POLL = 0.05  # s between polls of one replica
PROPAGATION_HITS = 4  # answers in a row that list the image
PROPAGATION_TIMEOUT = 10.0
PROPAGATION_LIMIT = 1.0  # s: CE_FRESHNESS_BOUND's default, the README's promise
PROPAGATION_IDC = "fleet-propagation"  # the write's idc: polls filter on it, so answers stay small
ADMIN_ORG = uuid.uuid5(uuid.NAMESPACE_URL, "cluster-engine-drill-fleet-admin")


@dataclass
class Answer:
    phase: str  # cold burst | owned burst | writes | propagation
    kind: str  # list | create | delete
    status: int  # 0: no HTTP answer
    latency: float  # s
    cause: str | None = None  # for an unexpected status: the status and the body
    problem: str | None = None  # for a 200 list: what is wrong with its images
    target: str = ""  # the replica it went to
    at: float = 0.0  # monotonic time it was sent
    contract_503: bool = False  # a 503 with the contract's body and a Retry-After


UNAVAILABLE = {"reason": "database is unavailable"}  # the contract's ServiceUnavailable example


EXPECTED = {"list": 200, "create": 201, "delete": 204}


def cause_of(kind: str, response: httpx.Response) -> str | None:
    if response.status_code == EXPECTED[kind]:
        return None
    return f"{kind} {response.status_code}: {response.text[:160]}"


def is_contract_503(response: httpx.Response) -> bool:
    if response.status_code != 503 or "retry-after" not in response.headers:
        return False
    try:
        return bool(msgspec.json.decode(response.content) == UNAVAILABLE)
    except msgspec.DecodeError:
        return False


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def list_problem(body: bytes, caller: str, expected: set[str]) -> str | None:
    """None when every image listed is Public or the caller's and every ``expected`` id is there."""
    try:
        items = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "body is not JSON"
    if not isinstance(items, list):
        return "body is not an array"
    for item in items:
        if not isinstance(item, dict):
            return "an item is not an object"
        if item.get("type") != "Public" and item.get("orgId") != caller:
            return f"shows {item.get('type')} image of another org ({item.get('orgId')})"
    missing = expected - {item.get("id") for item in items}
    return f"{len(missing)} seeded images missing" if missing else None


@dataclass
class Traffic:
    """What the drill sends, and every answer it got."""

    targets: list[str]  # every replica's URL (a restarted replica's new one replaces its old)
    secret: str
    public_ids: set[str]
    owned_ids: dict[int, set[str]]  # seeded org index -> its Customized image ids
    answers: list[Answer] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    write_times: list[float] = field(default_factory=list)  # monotonic send times of the writes
    down: set[str] = field(default_factory=set)  # replicas out of service (killed): no writes, no reads

    def in_service(self) -> list[str]:
        return [t for t in self.targets if t not in self.down] or self.targets

    def __post_init__(self) -> None:
        self.admin = mint_token(self.secret, ADMIN_ORG, scopes=[SCOPE_ADMIN], ttl=24 * 3600)
        self.writers = [
            mint_token(self.secret, org(i), scopes=[SCOPE_WRITE], ttl=24 * 3600) for i in range(ORGS)
        ]

    async def send(
        self, phase: str, kind: str, target: str, request: Any
    ) -> tuple[httpx.Response | None, Answer]:
        began = time.monotonic()
        try:
            response: httpx.Response = await request
        except httpx.HTTPError as exc:
            cause = f"{kind}: no answer ({type(exc).__name__})"
            answer = Answer(phase, kind, 0, time.monotonic() - began, cause, target=target, at=began)
            self.answers.append(answer)
            return None, answer
        answer = Answer(
            phase,
            kind,
            response.status_code,
            time.monotonic() - began,
            cause_of(kind, response),
            target=target,
            at=began,
            contract_503=is_contract_503(response),
        )
        self.answers.append(answer)
        return response, answer

    # ------------------------------------------------------------------------------------ bursts

    async def read_list(
        self, client: httpx.AsyncClient, phase: str, target: str, token: str, caller: str, expected: set[str]
    ) -> None:
        """GET /v1/images as ``caller`` (with its ``token``); a 200 must list exactly ``expected``."""
        request = client.get(f"{target}/v1/images", headers=_bearer(token))
        response, answer = await self.send(phase, "list", target, request)
        if response is not None and response.status_code == 200:
            answer.problem = list_problem(response.content, caller, expected)

    async def burst(
        self, client: httpx.AsyncClient, phase: str, jobs: list[tuple[str, str, str, set[str]]], width: int
    ) -> float:
        """GET /v1/images for each (target, token, caller org, expected ids), ``width`` at a time."""
        began = time.monotonic()
        queue = list(reversed(jobs))

        async def worker() -> None:
            while queue:
                await self.read_list(client, phase, *queue.pop())

        await asyncio.gather(*(worker() for _ in range(width)))
        return time.monotonic() - began

    def cold_jobs(self, rnd: random.Random, new_orgs: int) -> list[tuple[str, str, str, set[str]]]:
        orgs = [uuid.uuid4() for _ in range(new_orgs)]
        jobs = [
            (target, mint_token(self.secret, who), str(who), self.public_ids)
            for who in orgs
            for target in self.targets
        ]
        rnd.shuffle(jobs)
        return jobs

    def owned_jobs(self, rnd: random.Random) -> list[tuple[str, str, str, set[str]]]:
        jobs = [
            (target, mint_token(self.secret, org(i)), str(org(i)), self.public_ids | self.owned_ids[i])
            for i in range(ORGS)
            for target in self.targets
        ]
        rnd.shuffle(jobs)
        return jobs

    # ------------------------------------------------------------------------------------ writes

    async def write_forever(self, client: httpx.AsyncClient, stop: asyncio.Event, seed: int) -> None:
        """Paced writes at ``WRITE_RATE``/s over every replica until ``stop``: creates (a fifth of them
        Public, by the admin), and deletes of earlier creates (30% of writes once there are some)."""
        rnd = random.Random(seed)
        live: list[tuple[str, str]] = []  # (image id, token that may delete it)

        def write(now: float, target: str) -> Coroutine[Any, Any, None]:
            self.write_times.append(now)
            if live and rnd.random() < 0.3:
                image_id, token = live.pop(rnd.randrange(len(live)))
                return self._delete(client, target, image_id, token)
            return self._create(client, target, rnd, live)

        await self._paced(WRITE_RATE, stop, write)

    async def _paced(
        self, rate: float, stop: asyncio.Event, start: Callable[[float, str], Coroutine[Any, Any, None]]
    ) -> None:
        """Start ``start(now, target)`` as a task ``rate`` times a second until ``stop``, round the
        replicas in service (open-loop: never a catch-up burst after a stall); then wait for them all."""
        pending: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        sent = 0
        while not stop.is_set():
            now = time.monotonic()
            if next_at > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), next_at - now)
                continue
            next_at = max(next_at + 1 / rate, now - 1.0)
            targets = self.in_service()
            target = targets[sent % len(targets)]
            sent += 1
            task = asyncio.create_task(start(now, target))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*list(pending))

    async def _create(
        self, client: httpx.AsyncClient, target: str, rnd: random.Random, live: list[tuple[str, str]]
    ) -> None:
        name = f"{DRILL_PREFIX}{uuid.UUID(int=rnd.getrandbits(128)).hex[:16]}"
        if rnd.random() < 0.2:
            body = {**create_body(ADMIN_ORG, name=name, idc=rnd.choice(IDCS)), "type": "Public"}
            token = self.admin
        else:
            who = rnd.randrange(ORGS)
            body = create_body(org(who), name=name, idc=rnd.choice(IDCS))
            token = self.writers[who]
        request = client.post(f"{target}/v1/images", json=body, headers=_bearer(token))
        response, _ = await self.send("writes", "create", target, request)
        if response is not None and response.status_code == 201:
            image = response.json()
            self.ledger.created[image["id"]] = image
            live.append((image["id"], token))
        else:
            self.ledger.uncertain_names.add(name)

    async def _delete(self, client: httpx.AsyncClient, target: str, image_id: str, token: str) -> None:
        request = client.delete(f"{target}/v1/images/{image_id}", headers=_bearer(token))
        response, _ = await self.send("writes", "delete", target, request)
        if response is not None and response.status_code == 204:
            self.ledger.deleted.add(image_id)
        else:
            self.ledger.uncertain_deletes.add(image_id)

    # ------------------------------------------------------------------------------- propagation

    async def propagation(self, writer: httpx.AsyncClient, fresh: httpx.AsyncClient) -> Propagation:
        """One admin write of a Public image, then every replica polled until it lists the image."""
        result = Propagation()
        name = f"{DRILL_PREFIX}fleet-propagation-{uuid.uuid4().hex[:12]}"
        body = {**create_body(ADMIN_ORG, name=name, idc=PROPAGATION_IDC), "type": "Public"}
        sent = time.monotonic()
        origin = self.in_service()[0]
        response, answer = await self.send(
            "propagation",
            "create",
            origin,
            writer.post(f"{origin}/v1/images", json=body, headers=_bearer(self.admin)),
        )
        acked = time.monotonic()
        result.write_latency = acked - sent
        if response is None or response.status_code != 201:
            self.ledger.uncertain_names.add(name)
            result.error = answer.cause or "the write failed"
            return result
        image = response.json()
        self.ledger.created[image["id"]] = image
        needle = image["id"].encode()
        reader = mint_token(self.secret, uuid.uuid4())
        headers = _bearer(reader)

        async def watch(target: str) -> None:
            first_hit: float | None = None
            first_answer = 0.0
            hits = 0
            while time.monotonic() - acked < PROPAGATION_TIMEOUT:
                began = time.monotonic()
                polled, _ = await self.send(
                    "propagation",
                    "list",
                    target,
                    fresh.get(f"{target}/v1/images", params={"idc": PROPAGATION_IDC}, headers=headers),
                )
                got = time.monotonic()
                result.polls += 1
                if polled is not None and polled.status_code == 200 and needle in polled.content:
                    if first_hit is None:
                        first_hit, first_answer = began, got
                    hits += 1
                    if hits >= PROPAGATION_HITS:
                        result.seconds[target] = first_hit - acked
                        result.answered[target] = first_answer - acked
                        return
                else:
                    if began - acked > PROPAGATION_LIMIT:
                        result.stale += 1  # sent after the freshness bound, answered without the image
                    if first_hit is not None:
                        result.relapses += 1  # listed, then not: one worker had it, the other not yet
                    first_hit, hits = None, 0
                result.gaps.append(got - began)
                await asyncio.sleep(max(0.0, PROPAGATION_POLL - (time.monotonic() - began)))

        result.targets = self.in_service()
        await asyncio.gather(*(watch(target) for target in result.targets))
        return result

    # ------------------------------------------------------------------------------------ reads

    async def read_forever(self, client: httpx.AsyncClient, stop: asyncio.Event, seed: int) -> None:
        """Paced reads at ``READ_RATE``/s until ``stop``, round the replicas in service, each by one of the
        seeded orgs (a new connection each with a ``client`` that keeps none): the faults' witnesses."""
        rnd = random.Random(seed)
        tokens = [mint_token(self.secret, org(i), ttl=24 * 3600) for i in range(ORGS)]

        def read(_now: float, target: str) -> Coroutine[Any, Any, None]:
            who = rnd.randrange(ORGS)
            return self._read(client, target, who, tokens[who])

        await self._paced(READ_RATE, stop, read)

    async def _read(self, client: httpx.AsyncClient, target: str, who: int, token: str) -> None:
        await self.read_list(
            client, "reads", target, token, str(org(who)), self.public_ids | self.owned_ids[who]
        )


@dataclass
class Propagation:
    write_latency: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)  # target -> s from the 201 to the listing request
    answered: dict[str, float] = field(default_factory=dict)  # target -> s from the 201 to its answer
    stale: int = 0  # answers without the image to requests sent over PROPAGATION_LIMIT s after the 201
    polls: int = 0
    relapses: int = 0
    gaps: list[float] = field(default_factory=list)  # each poll's latency
    error: str | None = None
    targets: list[str] = field(default_factory=list)  # the replicas watched
