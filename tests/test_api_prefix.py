"""The API under the contract's ``/api`` prefix as well as at the root (prefix.py), and CE_ROOT_PATH.

Through a real server: the same bytes either way, links (Link, Location, redirects, the /docs page)
keep the prefix the request came in on, the served document lists this service first. ``Prefixes`` on
its own, with a recording app: what the inside sees and what leaves, for each way a prefix arrives.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster_engine.server import openapi
from cluster_engine.server.config import ConfigError, load_settings
from cluster_engine.server.prefix import Prefixes, normalize_root_path
from cluster_engine.testing import LiveServer

from .conftest import OTHER_ORG
from .toolkit import EXPIRED, INVALID


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A demo server of this module's own (tests here write to it)."""
    with LiveServer.start(tmp_path_factory.mktemp("prefix"), args=["--demo"]) as server:
        yield server


def _get(
    server: LiveServer, path: str, token: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{server.url}{path}", headers={**sent, **(headers or {})}, timeout=10)


@pytest.mark.parametrize("query", ["", "?idc=us-west-1", "?idc=us-west-1&product=gpu.h100.8x", "?limit=2"])
def test_api_list_is_the_same_bytes_as_the_root_list(
    served: LiveServer, demo_org: uuid.UUID, query: str
) -> None:
    token = served.token(demo_org)
    root, api = _get(served, f"/v1/images{query}", token), _get(served, f"/api/v1/images{query}", token)
    assert root.status_code == api.status_code == 200
    assert api.content == root.content and root.json()
    assert api.headers["etag"] == root.headers["etag"]
    assert api.headers["content-type"] == root.headers["content-type"] == "application/json"
    again = _get(served, f"/api/v1/images{query}", token, headers={"If-None-Match": root.headers["etag"]})
    assert again.status_code == 304


def test_api_image_by_id_and_its_errors_match_the_root(served: LiveServer, demo_org: uuid.UUID) -> None:
    token = served.token(demo_org)
    image_id = _get(served, "/v1/images", token).json()[0]["id"]
    for path in (f"/v1/images/{image_id}", f"/v1/images/{uuid.uuid4()}", "/v1/images/not-a-uuid"):
        root, api = _get(served, path, token), _get(served, f"/api{path}", token)
        assert (api.status_code, api.content) == (root.status_code, root.content)
        assert api.status_code in (200, 404, 400)


def test_link_under_api_keeps_the_prefix_and_pages_through_the_list(
    served: LiveServer, demo_org: uuid.UUID
) -> None:
    token = served.token(demo_org)
    whole = _get(served, "/api/v1/images", token).json()
    seen: list[dict[str, Any]] = []
    url: str | None = f"{served.url}/api/v1/images?limit=2"
    pages = 0
    while url is not None:
        response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 200
        seen += response.json()
        pages += 1
        link = response.headers.get("link")
        if link is None:
            break
        assert link.startswith("</api/v1/images?") and link.endswith('>; rel="next"'), link
        url = str(response.url.join(response.links["next"]["url"]))
        assert pages <= len(whole)
    assert seen == whole and pages > 1
    root_link = _get(served, "/v1/images?limit=2", token).headers["link"]
    assert root_link.startswith("</v1/images?")
    assert _get(served, "/api/v1/images?limit=2", token).headers["link"] == "</api" + root_link[1:]


def test_api_without_or_with_an_expired_token_is_the_contracts_401(
    served: LiveServer, demo_org: uuid.UUID
) -> None:
    for path in ("/v1/images", "/api/v1/images", f"/api/v1/images/{uuid.uuid4()}"):
        missing = _get(served, path)
        assert missing.status_code == 401 and missing.json() == INVALID
        assert missing.headers["www-authenticate"].startswith("Bearer")
        expired = _get(served, path, served.token(demo_org, ttl=-60))
        assert expired.status_code == 401 and expired.json() == EXPIRED
    assert _get(served, "/api/v1/images").content == _get(served, "/v1/images").content


def test_api_write_answers_location_with_the_prefix(served: LiveServer, demo_entries: list[Any]) -> None:
    token = served.token(OTHER_ORG, scopes=["images:write"])
    image = {key: value for key, value in demo_entries[0].items() if key not in {"id", "createdAt"}}
    image |= {"type": "Customized", "orgId": str(OTHER_ORG), "name": f"prefixed-{uuid.uuid4().hex[:8]}"}
    created = httpx.post(
        f"{served.url}/api/v1/images", json=image, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    assert location == f"/api/v1/images/{created.json()['id']}"
    fetched = _get(served, location, token)
    assert fetched.status_code == 200 and fetched.json() == created.json()
    root = _get(served, location.removeprefix("/api"), token)
    assert root.content == fetched.content
    patched = httpx.patch(
        f"{served.url}{location}",
        json={"supportedProducts": ["gpu.b200.8x"]},
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
        timeout=10,
    )
    assert patched.status_code == 200 and patched.json()["supportedProducts"] == ["gpu.b200.8x"]
    deleted = httpx.delete(
        f"{served.url}{location}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert deleted.status_code == 204
    assert _get(served, location, token).status_code == 404


def test_served_document_lists_this_service_first_and_the_same_under_api(served: LiveServer) -> None:
    root, api = _get(served, "/openapi.json"), _get(served, "/api/openapi.json")
    assert root.status_code == api.status_code == 200 and api.content == root.content
    servers = [server["url"] for server in root.json()["servers"]]
    assert servers == [".", "https://console.gmicloud.ai/api"]
    assert servers == [server["url"] for server in openapi.document()["servers"]]
    # "." is resolved against the document's own URL (OpenAPI 3.0 §4.7.5): the prefix it came in on
    assert str(api.url.join(servers[0])) == f"{served.url}/api/"
    assert str(root.url.join(servers[0])) == f"{served.url}/"
    assert _get(served, "/api/openapi.yaml").content == _get(served, "/openapi.yaml").content


def test_docs_page_and_its_assets_are_served_under_api(served: LiveServer) -> None:
    page = _get(served, "/api/docs")
    assert page.status_code == 200 and page.content == _get(served, "/docs").content
    assert 'url: "openapi.json"' in page.text
    assert 'src="/' not in page.text and 'href="/' not in page.text  # relative: they keep the prefix
    asset = page.url.join("docs/assets/swagger-ui-bundle.js")
    assert asset.path == "/api/docs/assets/swagger-ui-bundle.js"
    assert httpx.get(str(asset), timeout=10).status_code == 200


def test_probes_and_redirects_under_api(served: LiveServer) -> None:
    assert _get(served, "/api/healthz").json() == {"status": "ok"}
    assert _get(served, "/api/readyz").json()["status"] == "ready"
    redirected = _get(served, "/api/docs/")
    assert redirected.status_code == 307
    assert httpx.URL(redirected.headers["location"]).path == "/api/docs"


@pytest.mark.parametrize("path", ["/apiv1/images", "/api/api/v1/images", "/v1/api/images", "/API/v1/images"])
def test_only_a_leading_api_segment_is_a_prefix(served: LiveServer, demo_org: uuid.UUID, path: str) -> None:
    response = _get(served, path, served.token(demo_org))
    assert response.status_code == 404 and response.json() == {"reason": "not found"}


# ------------------------------------------------------------------------------- Prefixes on its own


class Recorder:
    """An inner app that records the scope it is given and answers with Location and Link headers."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        headers = [
            (b"location", b"/v1/images/x"),
            (b"link", b'</v1/images?limit=1&cursor=abc>; rel="next"'),
            (b"etag", b'"1"'),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"[]"})


def _through(prefixes: Prefixes, path: str, root_path: str = "") -> tuple[dict[str, Any], dict[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "root_path": root_path}
    asyncio.run(prefixes(scope, None, send))
    recorder = prefixes.app
    assert isinstance(recorder, Recorder)
    return recorder.scope, dict(sent[0]["headers"])


@pytest.mark.parametrize(
    ("configured", "path", "server_root", "inner_path", "prefix"),
    [
        ("", "/v1/images", "", "/v1/images", ""),
        ("", "/api/v1/images", "", "/v1/images", "/api"),
        ("", "/api", "", "/", "/api"),
        ("", "/apiv1", "", "/apiv1", ""),
        ("/gateway", "/v1/images", "", "/v1/images", "/gateway"),  # a proxy stripped /gateway
        ("/gateway", "/api/v1/images", "", "/v1/images", "/gateway/api"),
        ("/gateway", "/gateway/v1/images", "", "/v1/images", "/gateway"),  # or kept it in the path
        ("", "/v1/images", "/edge", "/v1/images", "/edge"),  # granian's url_path_prefix
        ("", "/edge/api/v1/images", "/edge", "/v1/images", "/edge/api"),  # uvicorn --root-path style
        ("/mine", "/v1/images", "/edge", "/v1/images", "/mine"),  # the setting wins over the server's
        ("", "/api/v1/images", "/", "/v1/images", "/api"),  # a server's root_path of "/" is no prefix
    ],
)
def test_prefixes_strip_the_prefix_and_put_it_back_in_front_of_links(
    configured: str, path: str, server_root: str, inner_path: str, prefix: str
) -> None:
    prefixes = Prefixes(Recorder(), configured)
    inner, headers = _through(prefixes, path, server_root)
    assert inner["path"] == inner_path and inner["raw_path"] == inner_path.encode()
    assert inner.get("root_path", "") == prefix
    assert headers[b"location"] == f"{prefix}/v1/images/x".encode()
    assert headers[b"link"] == f'<{prefix}/v1/images?limit=1&cursor=abc>; rel="next"'.encode()
    assert headers[b"etag"] == b'"1"'


def test_prefixes_leave_absolute_links_alone() -> None:
    from cluster_engine.server.prefix import _prefixed

    assert _prefixed(b"http://h/v1/images/x", b"/api") == b"http://h/v1/images/x"
    assert _prefixed(b'</a>; rel="next", <https://h/b>; rel="x"', b"/api") == (
        b'</api/a>; rel="next", <https://h/b>; rel="x"'
    )


def test_root_path_setting_is_normalized_and_checked(tmp_path: Path) -> None:
    assert load_settings({}, data_dir=tmp_path).root_path == ""
    assert load_settings({"CE_ROOT_PATH": "gateway/"}, data_dir=tmp_path).root_path == "/gateway"
    assert normalize_root_path("/a/b") == "/a/b"
    for bad in ("/a?b", "/a//b", "/../x", "/a b", "/a%2F"):
        with pytest.raises(ConfigError, match="CE_ROOT_PATH"):
            load_settings({"CE_ROOT_PATH": bad}, data_dir=tmp_path)
