"""Per-org rate limiting (CE_RATE_LIMIT): the token bucket, and 429/Retry-After through a real server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster_engine.server.config import ConfigError, load_settings
from cluster_engine.server.ratelimit import Buckets, Rate
from cluster_engine.testing import LiveServer

from .toolkit import App

ORG_A, ORG_B = "org-a", "org-b"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_parse() -> None:
    assert Rate.parse("100/200") == Rate(100.0, 200)
    assert Rate.parse("2.5") == Rate(2.5, 3)
    assert str(Rate.parse("100/200")) == "100/200"
    for bad in ("", "x", "0/5", "10/0", "-1/3", "10/x"):
        with pytest.raises(ValueError):
            Rate.parse(bad)


def test_setting_is_off_by_default_and_validated(tmp_path: Path) -> None:
    assert load_settings({}, data_dir=tmp_path).rate_limit is None
    assert load_settings({"CE_RATE_LIMIT": "100/200"}, data_dir=tmp_path).rate_limit == "100/200"
    with pytest.raises(ConfigError, match="CE_RATE_LIMIT"):
        load_settings({"CE_RATE_LIMIT": "fast"}, data_dir=tmp_path)


def test_burst_then_refill_at_the_rate() -> None:
    clock = Clock()
    buckets = Buckets(Rate(2.0, 3), clock=clock)
    assert [buckets.take(ORG_A) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take(ORG_A) == pytest.approx(0.5)  # empty: the next token is half a second away
    assert buckets.take(ORG_B) == 0.0  # another org has its own bucket
    clock.now += 0.5
    assert buckets.take(ORG_A) == 0.0
    assert buckets.take(ORG_A) > 0
    clock.now += 100  # refills up to the burst, no further
    assert [buckets.take(ORG_A) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert buckets.take(ORG_A) > 0


def test_refusals_do_not_spend_tokens() -> None:
    clock = Clock()
    buckets = Buckets(Rate(1.0, 1), clock=clock)
    assert buckets.take(ORG_A) == 0.0
    for _ in range(100):
        assert buckets.take(ORG_A) > 0
    clock.now += 1.0
    assert buckets.take(ORG_A) == 0.0


def test_memory_is_bounded_for_unbounded_orgs() -> None:
    clock = Clock()
    buckets = Buckets(Rate(1.0, 5), max_orgs=100, clock=clock)
    for index in range(10_000):
        buckets.take(f"org-{index}")
        clock.now += 0.001
        assert len(buckets) <= 100
    # refilled buckets are the ones dropped: a throttled org keeps its state through a sweep
    for _ in range(5):
        buckets.take("greedy")
    assert buckets.take("greedy") > 0
    clock.now += 10
    for index in range(99):
        buckets.take(f"late-{index}")
    assert len(buckets) <= 100


# ------------------------------------------------------------------------------------- through HTTP


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[LiveServer]:
    # 0.01/s: a token every 100 s, so no refill can happen during the test however slow the machine is
    with LiveServer.start(tmp_path, env={"CE_RATE_LIMIT": "0.01/3"}, args=["--demo"]) as server:
        yield server


def test_org_past_its_share_gets_429_with_retry_after(limited: LiveServer) -> None:
    greedy, polite = uuid.uuid4(), uuid.uuid4()
    client = limited.client(greedy)
    assert [client.get("/v1/images").status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/v1/images")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    assert set(refused.json()) == {"reason"} and "rate limit" in refused.json()["reason"]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 100
    assert client.get("/v1/images/not-a-uuid").status_code == 429  # every route, writes too
    assert client.post("/v1/images", json={}).status_code == 429
    assert limited.client(polite).get("/v1/images").status_code == 200  # other orgs are unaffected
    # a request without a valid token is not counted against anyone: it is refused as before
    assert httpx.get(f"{limited.url}/v1/images", headers={"Authorization": "Bearer nope"}).status_code == 401
    metrics = httpx.get(f"{limited.url}/metrics").text
    throttled = [line for line in metrics.splitlines() if line.startswith("ce_http_throttled_total")]
    assert throttled and float(throttled[0].split()[-1]) == 3
    assert str(greedy) not in metrics  # no label per org
    limited.stop()
    log = limited.log()
    assert f"rate limit: org {greedy}" in log
    assert log.count(f"rate limit: org {greedy}") == 1  # logging is rate-limited too
    assert f"rate limit: org {polite}" not in log


def test_openapi_documents_the_429(app: App) -> None:
    document = app.http.get("/openapi.json").json()
    assert "429" in document["paths"]["/v1/images"]["get"]["responses"]
    assert "TooManyRequests" in document["components"]["responses"]
