"""End to end over HTTP: a real server process on a loopback port with a real SQLite file."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from cluster_engine.testing import LiveServer

from .toolkit import INVALID, NOT_FOUND, fresh_catalog


def sort_key(image: dict[str, Any]) -> tuple[str, str]:
    # createdAt values are RFC 3339 UTC; compare them as instants, then ids
    from datetime import datetime

    return (datetime.fromisoformat(image["createdAt"]).isoformat(), image["id"])


def visible(entries: list[dict[str, Any]], org: uuid.UUID) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("type", "Public") == "Public" or e["orgId"] == str(org)]


def test_list_returns_public_and_own_customized_in_documented_order(
    demo_server: LiveServer, demo_entries: list[dict[str, Any]], demo_org: uuid.UUID
) -> None:
    response = demo_server.client(demo_org).get("/v1/images")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert {image["id"] for image in body} == {e["id"] for e in visible(demo_entries, demo_org)}
    assert body == sorted(body, key=sort_key)
    assert any(image["type"] == "Customized" for image in body)


def test_other_org_never_sees_customized_images(
    demo_server: LiveServer, demo_entries: list[dict[str, Any]], other_org: uuid.UUID
) -> None:
    body = demo_server.client(other_org).get("/v1/images").json()
    assert body and all(image["type"] == "Public" for image in body)
    assert len(body) == len([e for e in demo_entries if e["type"] == "Public"])


@pytest.mark.parametrize(
    ("params", "check"),
    [
        ({"idc": "us-west-1"}, lambda i: i["idc"] == "us-west-1"),
        ({"product": "gpu.b200.8x"}, lambda i: "gpu.b200.8x" in i["supportedProducts"]),
        (
            {"idc": "us-east-2", "product": "gpu.l40s.4x"},
            lambda i: i["idc"] == "us-east-2" and "gpu.l40s.4x" in i["supportedProducts"],
        ),
    ],
)
def test_filters(
    demo_server: LiveServer,
    demo_entries: list[dict[str, Any]],
    demo_org: uuid.UUID,
    params: dict[str, str],
    check: Any,
) -> None:
    body = demo_server.client(demo_org).get("/v1/images", params=params).json()
    expected = [e["id"] for e in visible(demo_entries, demo_org) if check(e)]
    assert expected, "the demo catalog should exercise this filter"
    assert sorted(i["id"] for i in body) == sorted(expected)
    assert all(check(i) for i in body)


def test_unknown_filter_values_give_empty_list(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    assert client.get("/v1/images", params={"idc": "nowhere"}).json() == []
    assert client.get("/v1/images", params={"product": "gpu.none"}).json() == []


def test_unknown_query_parameters_are_ignored(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    assert client.get("/v1/images", params={"page": "2", "x": "%%"}).json() == client.get("/v1/images").json()


@pytest.mark.parametrize(
    ("query", "field", "expression"),
    [
        ("idc=bad%20idc", "idc", "pattern"),
        ("idc=", "idc", "pattern"),
        ("idc=" + "a" * 51, "idc", "max"),
        ("product=" + "p" * 257, "product", "max"),
        ("product=gpu%2Fh100", "product", "pattern"),
        ("idc=us-west-1%0A", "idc", "pattern"),
        ("idc=a&idc=b", "idc", "single"),
    ],
)
def test_invalid_queries_are_400_with_validation_detail(
    demo_server: LiveServer, demo_org: uuid.UUID, query: str, field: str, expression: str
) -> None:
    response = demo_server.client(demo_org).get(f"/v1/images?{query}")
    assert response.status_code == 400
    body = response.json()
    assert body["group"] == "request" and body["code"] == 0
    assert [(d["field"], d["expression"]) for d in body["validationDetail"]] == [(field, expression)]
    assert isinstance(body["validationDetail"][0]["originalValue"], str)


def test_every_bad_field_is_reported(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    response = demo_server.client(demo_org).get("/v1/images", params={"idc": "a b", "product": "c d"})
    assert response.status_code == 400
    assert [d["field"] for d in response.json()["validationDetail"]] == ["idc", "product"]


def test_auth_is_checked_before_the_query(demo_server: LiveServer) -> None:
    response = httpx.get(f"{demo_server.url}/v1/images?idc=bad%20idc")
    assert response.status_code == 401
    assert response.json() == INVALID
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_expired_token_is_code_1(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    token = demo_server.token(demo_org, ttl=-10)
    response = httpx.get(f"{demo_server.url}/v1/images", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json() == {"code": 1, "group": "auth_verify", "message": "Expired access token."}
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_get_by_id(
    demo_server: LiveServer, demo_entries: list[dict[str, Any]], demo_org: uuid.UUID, other_org: uuid.UUID
) -> None:
    customized = next(e for e in demo_entries if e["type"] == "Customized")
    public = next(e for e in demo_entries if e["type"] == "Public")
    own = demo_server.client(demo_org)
    other = demo_server.client(other_org)
    assert own.get(f"/v1/images/{customized['id']}").json()["name"] == customized["name"]
    assert other.get(f"/v1/images/{public['id']}").json()["id"] == public["id"]
    hidden = other.get(f"/v1/images/{customized['id']}")
    missing = other.get(f"/v1/images/{uuid.uuid4()}")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json() == missing.json() == NOT_FOUND
    assert hidden.headers.get("content-length") == missing.headers.get("content-length")


def test_get_by_malformed_id_is_400(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    response = demo_server.client(demo_org).get("/v1/images/not-a-uuid")
    assert response.status_code == 400
    assert response.json()["validationDetail"][0]["field"] == "id"


def test_etag_and_304(demo_server: LiveServer, demo_org: uuid.UUID, other_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    first = client.get("/v1/images", params={"idc": "us-west-1"})
    etag = first.headers["etag"]
    assert etag.startswith('"') and first.headers["cache-control"] == "private, max-age=0"
    again = client.get("/v1/images", params={"idc": "us-west-1"}, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get("/v1/images", headers={"If-None-Match": etag}).status_code == 200
    # another org sees a different set, so the same validator must not match it
    other = demo_server.client(other_org).get("/v1/images", params={"idc": "us-west-1"})
    assert other.headers["etag"] != etag


def test_unknown_route_and_method(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    response = client.get("/v2/nothing")
    assert response.status_code == 404 and response.json() == {"reason": "not found"}
    response = client.put("/v1/images", json={})
    assert response.status_code == 405 and "reason" in response.json()


def test_openapi_documents(demo_server: LiveServer) -> None:
    as_json = httpx.get(f"{demo_server.url}/openapi.json").json()
    as_yaml = httpx.get(f"{demo_server.url}/openapi.yaml")
    assert as_yaml.status_code == 200 and b"openapi: 3.0.1" in as_yaml.content
    assert "/v1/images/{id}" in as_json["paths"]


def test_writes_become_visible(
    shared_server: LiveServer, demo_entries: list[dict[str, Any]], demo_org: uuid.UUID
) -> None:
    server = fresh_catalog(shared_server)  # the demo entries are Public: every org sees them
    client = server.client(demo_org)
    assert client.get("/v1/images").json() == []
    output = server.import_catalog(demo_entries[:3])
    assert "created 3" in output
    assert len(client.get("/v1/images").json()) == 3
    assert "unchanged 3" in server.import_catalog(demo_entries[:3])


def test_pagination_walks_the_whole_list_in_order(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    everything = client.get("/v1/images").json()
    for params in ({}, {"idc": "us-west-1"}, {"product": "gpu.h100.8x"}):
        full = client.get("/v1/images", params=params).json()
        seen: list[dict[str, Any]] = []
        url: str | None = "/v1/images?" + httpx.QueryParams({**params, "limit": "4"}).__str__()
        pages = 0
        while url:
            response = client.get(url)
            assert response.status_code == 200
            page = response.json()
            assert 0 < len(page) <= 4
            seen += page
            pages += 1
            url = response.links.get("next", {}).get("url")
        assert seen == full
        assert pages == -(-len(full) // 4)
    assert len(everything) > 4


def test_pagination_parameters_are_validated(demo_server: LiveServer, demo_org: uuid.UUID) -> None:
    client = demo_server.client(demo_org)
    for query in (
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=" + "9" * 5000,
        "cursor=not-a-cursor",
        "limit=-1",
    ):
        response = client.get(f"/v1/images?{query}")
        assert response.status_code == 400, query
        assert response.json()["validationDetail"][0]["field"] in ("limit", "cursor")
    last = client.get("/v1/images", params={"limit": "1000"})
    assert "link" not in last.headers
