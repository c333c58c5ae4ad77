"""CORS (CE_CORS_ORIGINS, cors.py): preflights, headers on every answer (errors included), and a real
browser: a page on one loopback origin calls the API on another with a token; the same page served from
an origin that is not listed is refused."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.middleware.cors import CORSMiddleware

from cluster_engine.server.config import ConfigError, load_settings
from cluster_engine.server.cors import ALLOW_HEADERS, EXPOSE_HEADERS, METHODS, with_cors
from cluster_engine.testing import LiveServer, free_port
from cluster_engine.testing.pgserver import PostgresServer, PostgresUnavailable

from .conftest import chromium
from .toolkit import EXPIRED, INVALID

FRONT_END = "http://localhost:5173"
FOREIGN = "http://localhost:5174"
PAGE = "<!doctype html><html><head><title>front end</title></head><body>front end</body></html>"


@contextlib.contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """A plain HTTP server for ``directory`` on a free loopback port, in a thread; yields its origin."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *_args: None  # type: ignore[method-assign]
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two origins serving the same front-end page: the first is listed in CE_CORS_ORIGINS, the other not."""
    directory = tmp_path_factory.mktemp("site")
    (directory / "index.html").write_text(PAGE)
    with static_site(directory) as listed, static_site(directory) as unlisted:
        yield listed, unlisted


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory, sites: tuple[str, str]) -> Iterator[LiveServer]:
    env = {
        "CE_CORS_ORIGINS": f"{FRONT_END},{sites[0]}",
        # 3 requests per org, then about one per 100 s: each test uses fresh orgs; the 429 test a 4th request
        "CE_RATE_LIMIT": "0.01/3",
    }
    with LiveServer.start(tmp_path_factory.mktemp("cors"), env=env, args=["--demo"]) as server:
        yield server


def _preflight(server: LiveServer, method: str, path: str, origin: str, headers: str) -> httpx.Response:
    return httpx.options(
        f"{server.url}{path}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
        timeout=10,
    )


def test_preflight_for_the_list_under_api_allows_the_front_end_and_authorization(
    cors_server: LiveServer,
) -> None:
    response = _preflight(cors_server, "GET", "/api/v1/images", FRONT_END, "authorization")
    assert 200 <= response.status_code < 300
    assert response.headers["access-control-allow-origin"] == FRONT_END
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    assert "GET" in response.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in response.headers


WRITE_HEADERS = "authorization,content-type"
OPERATIONS = [
    ("GET", "/v1/images", "authorization,if-none-match"),
    ("GET", f"/v1/images/{uuid.UUID(int=1)}", "authorization,if-none-match"),
    ("POST", "/v1/images", WRITE_HEADERS),
    ("PATCH", f"/v1/images/{uuid.UUID(int=1)}", WRITE_HEADERS),
    ("DELETE", f"/v1/images/{uuid.UUID(int=1)}", "authorization"),
    ("GET", "/openapi.json", "x-request-id"),
]


@pytest.mark.parametrize("prefix", ["", "/api"])
@pytest.mark.parametrize(("method", "path", "headers"), OPERATIONS)
def test_preflights_are_answered_for_every_operation(
    cors_server: LiveServer, prefix: str, method: str, path: str, headers: str
) -> None:
    response = _preflight(cors_server, method, f"{prefix}{path}", FRONT_END, headers)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == FRONT_END
    assert method in response.headers["access-control-allow-methods"].split(", ")
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert set(headers.split(",")) <= allowed
    foreign = _preflight(cors_server, method, f"{prefix}{path}", FOREIGN, headers)
    assert "access-control-allow-origin" not in foreign.headers
    assert foreign.status_code == 400


def _get(server: LiveServer, path: str, origin: str, token: str | None, **headers: str) -> httpx.Response:
    sent = {"Origin": origin, **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return httpx.get(f"{server.url}{path}", headers=sent, timeout=10)


def _exposed(response: httpx.Response) -> set[str]:
    return {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}


def test_answers_to_the_front_end_carry_the_headers_and_expose_etag_link_location_retry_after(
    cors_server: LiveServer,
) -> None:
    token = cors_server.token(uuid.uuid4())
    page = _get(cors_server, "/api/v1/images?limit=1", FRONT_END, token)
    assert page.status_code == 200
    assert page.headers["access-control-allow-origin"] == FRONT_END
    assert "origin" in page.headers["vary"].lower()
    assert {"etag", "link", "location", "retry-after"} <= _exposed(page)
    assert _exposed(page) == {h.lower() for h in EXPOSE_HEADERS}
    assert page.headers["link"].startswith("</api/v1/images?")
    not_modified = _get(
        cors_server, "/v1/images?limit=1", FRONT_END, token, **{"If-None-Match": page.headers["etag"]}
    )
    assert not_modified.status_code == 304
    assert not_modified.headers["access-control-allow-origin"] == FRONT_END


def test_an_origin_not_listed_gets_no_allow_origin(cors_server: LiveServer) -> None:
    token = cors_server.token(uuid.uuid4())
    for path in ("/api/v1/images", "/v1/images"):
        response = _get(cors_server, path, FOREIGN, token)
        assert response.status_code == 200  # the browser, not the server, withholds it from the page
        assert "access-control-allow-origin" not in response.headers
        assert "origin" in response.headers["vary"].lower()
    without_origin = httpx.get(f"{cors_server.url}/v1/images", headers={"Authorization": f"Bearer {token}"})
    assert "access-control-allow-origin" not in without_origin.headers


def test_error_answers_carry_the_headers_so_browsers_can_read_them(cors_server: LiveServer) -> None:
    org = uuid.uuid4()
    expired = cors_server.token(org, ttl=-60)
    answers = {
        "401 missing": (_get(cors_server, "/api/v1/images", FRONT_END, None), 401, INVALID),
        "401 expired": (_get(cors_server, "/api/v1/images", FRONT_END, expired), 401, EXPIRED),
        "400": (
            _get(cors_server, "/api/v1/images?idc=a%20b", FRONT_END, cors_server.token(uuid.uuid4())),
            400,
            None,
        ),
        "404": (
            _get(cors_server, f"/v1/images/{uuid.uuid4()}", FRONT_END, cors_server.token(uuid.uuid4())),
            404,
            None,
        ),
        "405": (httpx.put(f"{cors_server.url}/v1/images", headers={"Origin": FRONT_END}), 405, None),
    }
    throttled = cors_server.token(uuid.uuid4())
    statuses = [_get(cors_server, "/v1/images", FRONT_END, throttled).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    answers["429"] = (_get(cors_server, "/v1/images", FRONT_END, throttled), 429, None)
    for name, (response, status, body) in answers.items():
        assert response.status_code == status, name
        assert response.headers["access-control-allow-origin"] == FRONT_END, name
        if body is not None:
            assert response.json() == body, name
    assert "retry-after" in answers["429"][0].headers and "retry-after" in _exposed(answers["429"][0])
    assert answers["400"][0].json()["group"] == "request"


def test_a_503_while_the_database_is_down_carries_the_headers(tmp_path: Path) -> None:
    """The hot path's own 503 (it cannot confirm its catalog is fresh): a throwaway PostgreSQL, stopped."""
    try:
        postgres = PostgresServer.start()
    except PostgresUnavailable:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("PostgreSQL server binaries not found")
    with postgres:
        url = postgres.create_database()
        env = {"CE_CORS_ORIGINS": FRONT_END}
        with LiveServer.start(tmp_path, database_url=url, args=["--migrate"], env=env) as server:
            token = server.token(uuid.uuid4())
            assert _get(server, "/api/v1/images", FRONT_END, token).status_code == 200
            postgres.stop("fast")
            deadline = time.monotonic() + 10  # freshness bound (1 s) plus the read deadline (1 s), and room
            response = _get(server, "/api/v1/images", FRONT_END, token)
            while response.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
                response = _get(server, "/api/v1/images", FRONT_END, token)
    assert response.status_code == 503
    assert response.json() == {"reason": "database is unavailable"}
    assert response.headers["access-control-allow-origin"] == FRONT_END
    assert "retry-after" in response.headers and "retry-after" in _exposed(response)


def test_cors_is_off_by_default(tmp_path: Path) -> None:
    assert load_settings({}, data_dir=tmp_path).cors_origins == ()
    with LiveServer.start(tmp_path / "plain") as server:
        preflight = _preflight(server, "GET", "/api/v1/images", FRONT_END, "authorization")
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
        answer = _get(server, "/v1/images", FRONT_END, server.token(uuid.uuid4()))
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_origins_setting_is_checked(tmp_path: Path) -> None:
    settings = load_settings(
        {"CE_CORS_ORIGINS": " http://localhost:5173 , https://a.example:8443"}, data_dir=tmp_path
    )
    assert settings.cors_origins == ("http://localhost:5173", "https://a.example:8443")
    assert load_settings({"CE_CORS_ORIGINS": "*"}, data_dir=tmp_path).cors_origins == ("*",)
    for bad in (
        "*,http://a.example",
        "http://a.example/",
        "localhost:5173",
        "ftp://a.example",
        "http://A.example",
        "http://a.example:x",
        "http://u@a.example",
    ):
        with pytest.raises(ConfigError, match="CE_CORS_ORIGINS"):
            load_settings({"CE_CORS_ORIGINS": bad}, data_dir=tmp_path)


# ------------------------------------------------------------------------------------ in a browser

CALL_THE_API = """async ([api, token]) => {
  const out = {};
  try {
    const page = await fetch(`${api}/api/v1/images?limit=1`, {headers: {Authorization: `Bearer ${token}`}});
    out.status = page.status;
    out.images = (await page.json()).length;
    out.etag = page.headers.get("ETag");
    out.link = page.headers.get("Link");
    const again = await fetch(`${api}/api/v1/images?limit=1`,
                              {headers: {Authorization: `Bearer ${token}`, "If-None-Match": out.etag}});
    out.again = again.status;
    const refused = await fetch(`${api}/api/v1/images`);
    out.unauthorized = [refused.status, await refused.json(), refused.headers.get("WWW-Authenticate")];
  } catch (error) {
    out.error = String(error);
  }
  return out;
}"""


def test_a_browser_page_on_a_listed_origin_calls_the_api_and_one_on_another_origin_is_refused(
    cors_server: LiveServer, sites: tuple[str, str]
) -> None:
    executable = chromium()
    from playwright.sync_api import sync_playwright

    listed, unlisted = sites
    token = cors_server.token(uuid.uuid4())
    results: dict[str, Any] = {}
    console: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        try:
            for name, origin in (("listed", listed), ("unlisted", unlisted)):
                page = browser.new_page()
                page.on("console", lambda message: console.append(message.text))
                page.goto(f"{origin}/index.html", timeout=20_000)
                results[name] = page.evaluate(CALL_THE_API, [cors_server.url, token])
                page.close()
        finally:
            browser.close()
    listed_result = results["listed"]
    assert "error" not in listed_result, listed_result
    assert listed_result["status"] == 200 and listed_result["images"] == 1
    assert listed_result["etag"] and listed_result["link"].startswith(
        "</api/v1/images?"
    )  # exposed to the page
    assert listed_result["again"] == 304
    assert listed_result["unauthorized"][:2] == [401, INVALID]
    assert listed_result["unauthorized"][2].startswith("Bearer")
    assert "Failed to fetch" in results["unlisted"].get("error", ""), results["unlisted"]
    assert "status" not in results["unlisted"]
    assert any("CORS policy" in line for line in console), console


# ------------------------------------------------------------ Cors against Starlette's middleware


def _answer_headers(app: Any, headers: list[tuple[bytes, bytes]], answer: list[tuple[bytes, bytes]]) -> Any:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(answer)})
        await send({"type": "http.response.body", "body": b"[]"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/images", "headers": headers, "query_string": b""}
    asyncio.run(app(inner)(scope, None, send))
    return {(k.lower(), v) for k, v in sent[0]["headers"]}


@pytest.mark.parametrize("origins", [(FRONT_END,), (FRONT_END, "https://b.example"), ("*",)])
@pytest.mark.parametrize("origin", [None, FRONT_END, "https://b.example", FOREIGN])
@pytest.mark.parametrize("vary", [False, True])
def test_cors_adds_what_starlettes_middleware_adds(
    origins: tuple[str, ...], origin: str | None, vary: bool
) -> None:
    request = [(b"host", b"x")] + ([(b"origin", origin.encode())] if origin else [])
    answer = [(b"content-type", b"application/json"), (b"etag", b'"1"')] + (
        [(b"vary", b"Accept")] if vary else []
    )
    ours = _answer_headers(lambda app: with_cors(app, origins), request, answer)
    theirs = _answer_headers(
        lambda app: CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=METHODS,
            allow_headers=ALLOW_HEADERS,
            expose_headers=EXPOSE_HEADERS,
        ),
        request,
        answer,
    )
    allowed = origin is not None and (origins == ("*",) or origin in origins)
    if not allowed:  # Starlette also sends Access-Control-Expose-Headers to origins it refuses; we need not
        theirs = {(k, v) for k, v in theirs if k != b"access-control-expose-headers"}
    assert ours == theirs
    assert any(k == b"access-control-allow-origin" for k, _ in ours) is allowed
