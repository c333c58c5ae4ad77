"""Operability over HTTP: probes, metrics, request ids, access logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster_engine.server import observability
from cluster_engine.server.observability import AccessLog, Metrics
from cluster_engine.server.pids import children
from cluster_engine.testing import LiveServer
from cluster_engine.testing.pgserver import PostgresServer

from .conftest import chromium


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
    slowest = (
        "ce_http_request_duration_seconds_bucket",
        (("le", "+Inf"), ("method", "GET"), ("route", "/v1/images")),
    )
    assert found[slowest] == 21  # buckets are cumulative: every request is in +Inf
    revisions = [v for (name, _), v in found.items() if name == "ce_catalog_revision"]
    assert len(revisions) == 2 and all(v >= 1 for v in revisions)
    held = [
        v
        for (name, labels), v in found.items()
        if name == "ce_catalog_images_held" and ("type", "Public") in labels
    ]
    assert held and all(v == 22 for v in held)


def test_batched_request_metrics_equal_one_observation_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests are tallied in the worker and flushed in batches: the exposition must be exactly what
    one prometheus_client observation per request gives (bucket edges included). Multiprocess mode is
    covered over HTTP by test_metrics_count_requests_by_route_and_status."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    assert metrics._batched, "prometheus_client's histogram internals changed: batching is off"
    reference = CollectorRegistry()
    requests = Counter("ce_http_requests", "", ["route", "method", "status"], registry=reference)
    latency = Histogram(
        "ce_http_request_duration_seconds",
        "",
        ["route", "method"],
        buckets=observability._LATENCY_BUCKETS,
        registry=reference,
    )
    latency.labels("/v1/images", "GET")
    observations = [
        ("/v1/images", 200, 0.0001),
        ("/v1/images", 200, 0.0005),  # exactly on a bucket edge
        ("/v1/images", 304, 0.0007),
        ("/v1/images", 200, 0.003),
        ("/v1/images/{id}", 404, 0.2),
        ("/v1/images", 200, 7.5),  # beyond the last bound: +Inf only
    ]
    for route, status, seconds in observations:
        metrics.observe(route, "GET", status, seconds)
        requests.labels(route, "GET", str(status)).inc()
        latency.labels(route, "GET").observe(seconds)

    def ours() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = samples(metrics.exposition()[0].decode())
        return {
            k: v
            for k, v in found.items()
            if k[0].startswith(("ce_http_requests_total", "ce_http_request_duration"))
            and not k[0].endswith("_created")
        }

    expected = samples(generate_latest(reference).decode())
    expected = {k: v for k, v in expected.items() if not k[0].endswith("_created")}
    assert ours() == expected  # exposition() flushes first
    metrics.flush()  # nothing pending: flushing again changes nothing
    assert ours() == expected


def test_access_log_formats_json_and_text_lines() -> None:
    import io

    stream = io.StringIO()
    log = AccessLog(stream, json_lines=True)
    log.record(1_700_000_000.25, b"id-1", "GET", '/v1/images"x', "other", 200, 0.0012345, None)
    log.record(1_700_000_001.5, b"id-2", "POST", "/v1/images", "/v1/images", 201, 0.01, "org-a")
    log.flush()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "INFO",
        "logger": "access",
        "requestId": "id-1",
        "method": "GET",
        "path": '/v1/images"x',
        "route": "other",
        "status": 200,
        "durationMs": 1.234,
        "orgId": None,
    }
    assert second["time"] == "2023-11-14T22:13:21.500Z" and second["orgId"] == "org-a"
    text = io.StringIO()
    readable = AccessLog(text, json_lines=False)
    readable.record(1_700_000_000.25, b"id-1", "GET", "/v1/images", "/v1/images", 200, 0.0012, None)
    readable.flush()
    assert text.getvalue() == "2023-11-14T22:13:20.250Z INFO access: 200 GET /v1/images 1.2ms org=- id=id-1\n"


def test_access_log_is_one_json_line_per_request_without_the_token(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path, args=["--demo"]) as server:
        org = uuid.uuid4()
        token = server.token(org)
        client = server.client(org)
        client.get("/v1/images", params={"idc": "us-west-1"}, headers={"X-Request-ID": "log-me"})
        client.get("/v1/images", params={"idc": "bad idc"})
        time.sleep(0.5)  # lines are flushed in batches
        log = server.log()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    lines = [line for line in records if line["logger"] == "access"]
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


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_docs_page_renders_the_list_operation_offline(
    demo_server: LiveServer, tmp_path: Path, prefix: str
) -> None:
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            outside: list[str] = []
            base = f"{demo_server.url}{prefix}/"  # under /api, everything comes from under /api
            page.on(
                "request",
                lambda request: outside.append(request.url) if not request.url.startswith(base) else None,
            )
            page.goto(f"{demo_server.url}{prefix}/docs", timeout=20_000)
            page.wait_for_selector("#operations-images-listImages", timeout=20_000)
            page.click("#operations-images-listImages .opblock-summary")
            page.wait_for_selector("text=idc", timeout=10_000)
            page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
            assert "List images" in page.content()
        finally:
            browser.close()
    assert (tmp_path / "docs.png").stat().st_size > 10_000
    assert outside == [], f"the page fetched from outside the service: {outside[:3]}"


def test_sigterm_finishes_accepted_requests_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM under load: exit 0 within 10 s, and every request the server took was answered in full.
    Which requests the server took is read from its access log (each request carries its own
    X-Request-ID), not guessed from the client's clock: a client thread can be descheduled between
    noting the time and sending, so on a loaded machine a request "started" before the signal may reach
    the server after it, where a keep-alive connection being closed refuses it (the keep-alive race a
    client retries)."""
    server = LiveServer.start(tmp_path, args=["--demo", "--workers", "2"])
    org = uuid.uuid4()
    token = server.token(org)
    results: list[tuple[float, str, str]] = []  # (started, request id, outcome)
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=5
        ) as client:
            for i in range(5000):
                if stop.is_set():
                    return
                request_id = f"sigterm-{worker}-{i}"
                started = time.monotonic()
                try:
                    outcome = str(client.get("/v1/images", headers={"X-Request-ID": request_id}).status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                results.append((started, request_id, outcome))

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        # signal once load is flowing (not after a fixed sleep: on a loaded machine the clients may not
        # have sent anything within a second)
        deadline = time.monotonic() + 30
        while len(results) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled = time.monotonic()
        code = server.stop(timeout=15)
        stopped = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        server.stop()
    assert code == 0, server.log()[-2000:]
    assert stopped - signalled < 10
    answered = {}  # request id -> the status the server logged for it
    for line in server.log().splitlines():
        if line.startswith("{") and '"requestId":"sigterm-' in line:
            entry = json.loads(line)
            answered[entry["requestId"]] = str(entry["status"])
    # every request the server took and answered reached its client in full, with that status
    lost = [
        (rid, outcome, answered[rid])
        for _, rid, outcome in results
        if rid in answered and outcome != answered[rid]
    ]
    assert not lost, lost[:5]
    # the requests before the signal were answered (200); any other outcome is a connection-level
    # refusal of a request the server never took, never a partial or wrong answer
    before = [outcome for started, _, outcome in results if started < signalled]
    assert before.count("200") > 50, sorted(set(before))
    refused = {outcome for _, rid, outcome in results if rid not in answered}
    assert refused <= {"ConnectError", "RemoteProtocolError", "ReadError"}, refused
    assert all(answered[rid] == "200" for _, rid, _ in results if rid in answered), set(answered.values())


def test_slow_clients_do_not_starve_the_others(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    host, port = demo_server.url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"GET /v1/images HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {demo_server.token(demo_org)}"
        "\r\nX-Padding: " + "p" * 200 + "\r\n\r\n"
    ).encode()
    slow = [socket.create_connection((host, int(port)), timeout=5) for _ in range(50)]
    client = demo_server.client(demo_org)
    latencies = []
    try:
        deadline = time.monotonic() + 3.0
        sent = 0
        while time.monotonic() < deadline and sent < len(request) - 1:
            for sock in slow:  # one byte per connection per round: headers never complete
                sock.sendall(request[sent : sent + 1])
            sent += 1
            started = time.monotonic()
            assert client.get("/v1/images", params={"idc": "us-west-1"}).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    finally:
        for sock in slow:
            sock.close()
    assert len(latencies) > 20
    assert max(latencies) < 1.0, max(latencies)


def test_oversized_request_headers_are_refused(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    assert client.get("/v1/images", headers={"X-Big": "a" * 140_000}).status_code == 431  # > 2x the limit
    assert client.get("/v1/images", params={"x": "a" * 20_000}).status_code == 200


def test_idle_keep_alive_connections_are_closed(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path, env={"CE_HTTP_HEADER_TIMEOUT": "1"}) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert sock.recv(1000).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            assert sock.recv(1000) == b""  # closed by the server, not by our 5 s timeout
            assert time.monotonic() - started < 3


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_worker_is_replaced_and_its_metrics_forgotten(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path, args=["--demo", "--workers", "2"]) as server:
        client = server.client(uuid.uuid4())
        workers = set(children(server.process.pid))
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:
            current = set(children(server.process.pid))
            if len(current) == 2 and victim not in current:
                break
            assert server.process.poll() is None, f"the server exited:\n{server.log()[-2000:]}"
            assert time.monotonic() < deadline, f"no replacement worker:\n{server.log()[-2000:]}"
            time.sleep(0.1)
        server._wait_ready(15)
        assert all(client.get("/v1/images").status_code == 200 for _ in range(20))
        time.sleep(1.2)  # gauges are sampled every second
        found = samples(httpx.get(f"{server.url}/metrics").text)
    revisions = [v for (name, _), v in found.items() if name == "ce_catalog_revision"]
    assert len(revisions) == 2, "the killed worker's live gauges should be gone"
