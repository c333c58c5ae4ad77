"""The writer of ``bench orgs``' ``*_writes`` scenarios: a child process (``python -m bench.writer
CONFIG``) creating and deleting Customized images at a paced rate while wrk reads, and its statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt

from cluster_engine.testing.samples import image_body

from .catalog import IDCS, PRODUCTS
from .common import JWT_SECRET, PYTHON, ROOT, BenchError
from .processes import Cores, Process

TOKEN_TTL = 12 * 3600
WRITER_MAX_LIVE = 200  # images the writer has created and not yet deleted, at most
SCOPE_WRITE = "images:write"


def mint(org: uuid.UUID, scopes: Sequence[str] = (), ttl: int = TOKEN_TTL) -> str:
    """An HS256 token with the claims ``cluster-engine token`` puts in (orgId, iat, exp, scope)."""
    now = int(time.time())
    claims: dict[str, Any] = {"orgId": str(org), "iat": now, "exp": now + ttl}
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def bearer(org: uuid.UUID | str, scopes: Sequence[str] = ()) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(uuid.UUID(str(org)), scopes)}"}


def create_body(rng: random.Random, org: uuid.UUID | str) -> dict[str, Any]:
    """A valid ``ImageCreateReq`` (plus ``type``) for a Customized image of ``org``, with a fresh name."""
    idc = rng.choice(IDCS)
    products = sorted(rng.sample(PRODUCTS, rng.randint(2, 4)), key=PRODUCTS.index)
    name = f"Written-{uuid.UUID(int=rng.getrandbits(128)).hex}"
    return image_body(org, name, type="Customized", idc=idc, supportedProducts=products)


def writer_main(config_path: str) -> int:
    """The writer process: paced creates and deletes of Customized images over random orgs until SIGTERM,
    then the deletion of whatever it created; every write's (start, end, op, status) goes to a JSON file.
    One write at a time, on a fixed schedule (``rate`` per second) that never bursts to catch up."""
    config = json.loads(Path(config_path).read_text())
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(config["seed"])
    orgs: list[str] = config["orgs"]
    tokens: dict[str, dict[str, str]] = {}
    live: list[tuple[str, str]] = []  # (image id, org)
    records: list[tuple[float, float, str, int]] = []

    def auth(org: str) -> dict[str, str]:
        if org not in tokens:
            tokens[org] = bearer(org, [SCOPE_WRITE])
        return tokens[org]

    def delete(client: httpx.Client, image_id: str, org: str) -> int:
        return client.delete(f"/v1/images/{image_id}", headers=auth(org)).status_code

    with httpx.Client(base_url=config["base"], timeout=10.0) as client:
        interval = 1.0 / config["rate"]
        schedule, k = time.monotonic(), 0
        while not stop:
            delay = schedule + k * interval - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.1))
                continue
            if delay < -2 * interval:  # fell behind (slow answers): a new schedule rather than a burst
                schedule, k = time.monotonic(), 0
            k += 1
            create = not live or (len(live) < WRITER_MAX_LIVE and rng.random() < 0.5)
            started = time.time()
            try:
                if create:
                    org = rng.choice(orgs)
                    response = client.post("/v1/images", json=create_body(rng, org), headers=auth(org))
                    status = response.status_code
                    if status == 201:
                        live.append((response.json()["id"], org))
                else:
                    image_id, org = live.pop(rng.randrange(len(live)))
                    status = delete(client, image_id, org)
            except httpx.HTTPError:
                status = 0
            records.append((started, time.time(), "create" if create else "delete", status))
        left = 0
        for image_id, org in live:
            with contextlib.suppress(httpx.HTTPError):
                if delete(client, image_id, org) == 204:
                    continue
            left += 1
    Path(config["out"]).write_text(json.dumps({"records": records, "left": left}))
    return 0


@dataclasses.dataclass(frozen=True)
class WriteStats:
    rate: float  # writes finished per second over the measured wrk run
    writes: int
    failed: int  # status not 201/204 (0 = no answer)
    p50_ms: float
    p99_ms: float
    left: int  # images the writer could not delete at the end


class Writer:
    def __init__(
        self, cores: Cores, base: str, orgs: Sequence[uuid.UUID], rate: float, seed: int, workdir: Path
    ) -> None:
        self.out = workdir / "writer.json"
        config = workdir / "writer-config.json"
        settings = {
            "base": base,
            "orgs": [str(o) for o in orgs],
            "rate": rate,
            "seed": seed,
            "out": str(self.out),
        }
        config.write_text(json.dumps(settings))
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.process = Process(
            "writer",
            [*cores.load, PYTHON, "-m", "bench.writer", str(config)],
            {**os.environ, "PYTHONPATH": path},
            workdir / "writer.log",
        )

    def finish(self, window: tuple[float, float]) -> WriteStats:
        """Stop the writer (it deletes what it created) and count its writes over ``window``."""
        with contextlib.suppress(ProcessLookupError):
            self.process.popen.send_signal(signal.SIGTERM)
        try:
            self.process.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.process.stop()
            raise BenchError(f"the writer did not finish:\n{self.process.log_tail()}") from None
        if self.process.popen.returncode != 0 or not self.out.exists():
            raise BenchError(
                f"the writer failed ({self.process.popen.returncode}):\n{self.process.log_tail()}"
            )
        data = json.loads(self.out.read_text())
        start, end = window
        inside = [r for r in data["records"] if start <= r[1] <= end]
        latencies = sorted((r[1] - r[0]) * 1000 for r in inside)
        return WriteStats(
            rate=len(inside) / (end - start),
            writes=len(inside),
            failed=sum(1 for r in inside if r[3] not in (201, 204)),
            p50_ms=_quantile(latencies, 0.5),
            p99_ms=_quantile(latencies, 0.99),
            left=int(data["left"]),
        )

    def stop(self) -> None:
        self.process.stop()


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))]


if __name__ == "__main__":
    sys.exit(writer_main(sys.argv[1]))
