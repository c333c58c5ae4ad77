"""Operability over HTTP: probes, metrics, request ids, access logs."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster_engine.pgserver import PostgresServer
from cluster_engine.testing import LiveServer


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_probes_are_unauthenticated_and_cheap(demo_server: LiveServer) -> None:
    health = httpx.get(f"{demo_server.url}/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(f"{demo_server.url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["revision"] >= 1 and body["images"] > 0


def test_request_id_is_echoed_or_generated(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    given = client.get("/v1/images", headers={"X-Request-ID": "trace-42.a"})
    assert given.headers["x-request-id"] == "trace-42.a"
    first, second = client.get("/v1/images"), client.get("/v1/images/not-a-uuid")
    assert first.headers["x-request-id"] and second.headers["x-request-id"]
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    # an unusable id (too long, odd characters) is replaced rather than echoed
    odd = client.get("/v1/images", headers={"X-Request-ID": "x" * 500})
    assert odd.headers["x-request-id"] != "x" * 500


def test_metrics_count_requests_by_route_and_status(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path, args=["--demo", "--workers", "2"]) as server:
        org = uuid.uuid4()
        client = server.client(org)
        for _ in range(20):
            assert client.get("/v1/images").status_code == 200
        assert client.get(f"/v1/images/{uuid.uuid4()}").status_code == 404
        assert httpx.get(f"{server.url}/v1/images").status_code == 401
        time.sleep(1.2)  # the state gauges are refreshed every second
        response = httpx.get(f"{server.url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        found = samples(response.text)
    # requests from both workers are summed (multiprocess mode)
    ok = found[("ce_http_requests_total", (("method", "GET"), ("route", "/v1/images"), ("status", "200")))]
    assert ok == 20
    assert found[
        ("ce_http_requests_total", (("method", "GET"), ("route", "/v1/images/{id}"), ("status", "404")))
    ]
    assert found[("ce_auth_failures_total", (("reason", "missing"),))] == 1
    count = found[("ce_http_request_duration_seconds_count", (("method", "GET"), ("route", "/v1/images")))]
    assert count == 21
    revisions = [v for (name, _), v in found.items() if name == "ce_catalog_revision"]
    assert len(revisions) == 2 and all(v >= 1 for v in revisions)
    held = [
        v
        for (name, labels), v in found.items()
        if name == "ce_catalog_images_held" and ("type", "Public") in labels
    ]
    assert held and all(v == 22 for v in held)


def test_access_log_is_one_json_line_per_request_without_the_token(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path, args=["--demo"]) as server:
        org = uuid.uuid4()
        token = server.token(org)
        client = server.client(org)
        client.get("/v1/images", params={"idc": "us-west-1"}, headers={"X-Request-ID": "log-me"})
        client.get("/v1/images", params={"idc": "bad idc"})
        time.sleep(0.5)  # lines are flushed in batches
        log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line["requestId"] == "log-me"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["status"] == 200 and entry["method"] == "GET" and entry["route"] == "/v1/images"
    assert entry["orgId"] == str(org) and entry["durationMs"] >= 0
    assert any(line["status"] == 400 for line in lines)
    assert token not in log


@pytest.mark.parametrize("mode", ["fast"])
def test_readyz_fails_during_a_database_outage_and_recovers(tmp_path: Path, mode: str) -> None:
    with PostgresServer.start() as postgres:
        url = postgres.create_database()
        with LiveServer.start(tmp_path, database_url=url, args=["--migrate"]) as server:
            assert httpx.get(f"{server.url}/readyz").status_code == 200
            postgres.stop(mode)
            deadline = time.monotonic() + 5
            status = 200
            while status == 200 and time.monotonic() < deadline:
                response = httpx.get(f"{server.url}/readyz", timeout=5)
                status = response.status_code
                time.sleep(0.1)
            assert status == 503
            assert response.json() == {"reason": "database is unavailable"}
            assert httpx.get(f"{server.url}/healthz").status_code == 200  # alive, just not ready
            postgres.start_again()
            deadline = time.monotonic() + 5
            while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "readyz did not recover"
                time.sleep(0.1)
            metrics = httpx.get(f"{server.url}/metrics").text
    assert "ce_db_errors_total" in metrics
