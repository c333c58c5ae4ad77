"""Catalog writes over HTTP against a real server process, on SQLite and on PostgreSQL.

POST /v1/images, PATCH and DELETE /v1/images/{id}: scopes, validation, duplicates, size limits, the
404-not-403 rule for hidden images; then the operator side: the audit trail and catalog export/import.
Every rejected write is checked to leave the catalog exactly as it was (the catalog revision served by
/readyz, which every committed write bumps, and every involved org's list).

The tests share one server per store (``shared_server``); each starts with an empty catalog
(``fresh_catalog``), because these rules speak of Public images, exports and the audit trail, which every
org sees.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from cluster_engine.server.auth import mint_token
from cluster_engine.testing import LiveServer, image_body

from .toolkit import ADMIN, INVALID, NOT_FOUND, WRITE, Api, assert_reason, details, fresh_catalog

MIB = 1024 * 1024
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
REQUIRED_FIELDS = [
    "idc",
    "orgId",
    "path",
    "name",
    "OSSeries",
    "OSVersion",
    "OSArchitecture",
    "BootMode",
    "SystemDiskSize",
    "DefaultPartitionTable",
    "icon",
    "supportedProducts",
]
MUTABLE_FIELDS = [f for f in REQUIRED_FIELDS if f not in ("idc", "orgId")]


def assert_not_found_like_missing(api: Api, response: httpx.Response, org: uuid.UUID, method: str) -> None:
    """A hidden image is answered exactly like a random id that never existed (status, body, type)."""
    missing = str(uuid.uuid4())
    if method == "PATCH":
        reference = api.patch(org, [WRITE], missing, {"OSVersion": "1"})
    else:
        reference = api.request(method, f"/v1/images/{missing}", org, [WRITE])
    assert reference.status_code == 404
    assert response.status_code == 404, response.text
    assert response.content == reference.content
    assert response.json() == NOT_FOUND
    assert response.headers["content-type"] == reference.headers["content-type"]


@pytest.fixture
def server(shared_server: LiveServer) -> LiveServer:
    return fresh_catalog(shared_server)


def sort_key(image: dict[str, Any]) -> tuple[dt.datetime, str]:
    return (dt.datetime.fromisoformat(image["createdAt"]), image["id"])


# ---------------------------------------------------------------------------------------------- create


def test_create_scopes_response_and_visibility(server: LiveServer) -> None:
    api = Api(server)
    org_a, org_b = uuid.uuid4(), uuid.uuid4()

    # images:write creates a Customized image (the default type) of its own org.
    body = image_body(org_a, supportedProducts=["gpu.h100.8x", "gpu.h100.8x", "cpu.small"])
    response = api.create(org_a, [WRITE], body)
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    image = response.json()
    assert response.headers["location"] == f"/v1/images/{image['id']}"
    assert uuid.UUID(image["id"]).version == 4 and str(uuid.UUID(image["id"])) == image["id"]
    assert image["type"] == "Customized"
    created_at = dt.datetime.fromisoformat(image["createdAt"])
    assert created_at.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - created_at) < dt.timedelta(minutes=5)
    expected = {**body, "supportedProducts": ["gpu.h100.8x", "cpu.small"]}  # duplicates dropped
    assert {k: v for k, v in image.items() if k not in ("id", "type", "createdAt")} == expected
    # The full ImageResp: every field of the contract, and no others.
    assert set(image) == {*REQUIRED_FIELDS, "id", "type", "createdAt"}
    # Read-your-writes: GET by id and the list answer it at once.
    assert api.get(org_a, image["id"]).json() == image
    assert api.list(org_a) == [image]
    assert api.ids(org_a, product="cpu.small") == [image["id"]]
    assert api.get(org_b, image["id"]).status_code == 404
    assert api.list(org_b) == []

    # An explicit "type": "Customized" is the same as leaving it out.
    explicit = api.created(org_a, [WRITE], image_body(org_a, name="explicit", type="Customized"))
    assert explicit["type"] == "Customized" and "type" in explicit

    with api.unchanged(org_a, org_b):
        # images:write: another org's orgId, or a Public image, is forbidden.
        assert_reason(api.create(org_a, [WRITE], image_body(org_b, name="theirs")), 403)
        assert_reason(api.create(org_a, [WRITE], image_body(org_a, name="pub", type="Public")), 403)
        assert_reason(api.create(org_a, [WRITE], image_body(org_b, name="pub2", type="Public")), 403)
        # No write or admin scope at all: 403, even with an unrelated scope.
        assert_reason(api.create(org_a, [], image_body(org_a, name="ro")), 403)
        assert_reason(api.create(org_a, ["images:read", "openid"], image_body(org_a, name="ro")), 403)
        # No token, or a bad one: 401 with the auth_verify body.
        for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
            response = api.http.post("/v1/images", json=image_body(org_a, name="anon"), headers=headers)
            assert response.status_code == 401
            assert response.json() == INVALID
            assert response.headers["www-authenticate"].startswith("Bearer")
        expired = mint_token(server.secret, org_a, scopes=[WRITE], ttl=-60)
        response = api.http.post(
            "/v1/images", json=image_body(org_a), headers={"Authorization": f"Bearer {expired}"}
        )
        assert response.status_code == 401 and response.json()["code"] == 1

    # images:admin publishes Public images and creates images of any org.
    public = api.created(org_a, [ADMIN], image_body(org_a, name="Public-1", type="Public"))
    assert public["type"] == "Public" and public["orgId"] == str(org_a)
    for_b = api.created(org_a, [ADMIN], image_body(org_b, name="for-b"))
    assert for_b["type"] == "Customized" and for_b["orgId"] == str(org_b)
    both = api.created(org_b, [WRITE, ADMIN], image_body(org_b, name="Public-2", type="Public"))

    # Visibility of the result: every org sees every Public image, only its own Customized ones.
    stranger = uuid.uuid4()
    assert api.ids(org_a) == [image["id"], explicit["id"], public["id"], both["id"]]
    assert api.ids(org_b) == [public["id"], for_b["id"], both["id"]]
    assert api.ids(stranger) == [public["id"], both["id"]]
    assert api.get(org_b, public["id"]).json() == public
    assert api.get(org_a, for_b["id"]).status_code == 404


def send_big(
    api: Api,
    method: str,
    path: str,
    org: uuid.UUID | None,
    scopes: Sequence[str],
    content: Any,
    authorization: str | None = None,
) -> httpx.Response:
    """Send a body the server refuses without reading it all, on a connection of its own.

    The server answers and closes while the client may still be sending; the kernel then resets the
    connection and, rarely, the answer is lost before the client reads it (no lingering close). That
    transport race is not what these tests are about, so such a send is retried a few times.
    """
    headers = {**api.headers(org, scopes), "Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    for attempt in range(4):
        with httpx.Client(base_url=api.server.url, timeout=10) as client:
            try:
                body = content() if callable(content) else content
                return client.request(method, path, content=body, headers=headers)
            except httpx.TransportError:
                if attempt == 3:
                    raise
    raise AssertionError("unreachable")


def chunks(data: bytes) -> Any:
    """A body without Content-Length (chunked transfer encoding), so only reading it reveals its size."""
    return lambda: iter([data[:MIB], data[MIB:]])


def test_auth_and_scope_are_checked_before_the_body(server: LiveServer) -> None:
    api = Api(server)
    org = uuid.uuid4()
    big = b'{"idc": "' + b"x" * (2 * MIB) + b'"}'
    with api.unchanged(org):
        # Without a (valid) token nothing of the body matters: 401, not 413 nor 400.
        for authorization in (None, "Bearer nope"):
            for content in (big, chunks(big), b"{not json", b"[]"):
                response = send_big(api, "POST", "/v1/images", None, [], content, authorization)
                assert response.status_code == 401, (authorization, response.text)
                assert response.json()["group"] == "auth_verify"
        # A read-only token: 403 before the body is looked at.
        for content in (big, chunks(big), b"{not json"):
            assert_reason(send_big(api, "POST", "/v1/images", org, [], content), 403)
        # With the write scope, a body over 1 MiB is a 413 (declared length, and chunked without one).
        assert_reason(send_big(api, "POST", "/v1/images", org, [WRITE], big), 413)
        assert_reason(send_big(api, "POST", "/v1/images", org, [WRITE], chunks(big)), 413)
        # The same limit applies to PATCH (here on an id that does not exist: size is checked first).
        assert_reason(send_big(api, "PATCH", f"/v1/images/{uuid.uuid4()}", org, [WRITE], big), 413)
        assert_reason(send_big(api, "PATCH", f"/v1/images/{uuid.uuid4()}", org, [WRITE], chunks(big)), 413)
    # Exactly 1 MiB is still accepted by the size check (then judged on its content).
    padded = json.dumps(image_body(org, name="padded", path="p")).encode()
    padded = padded[:-1] + b', "pad": "' + b"x" * (MIB - len(padded) - 11) + b'"}'
    assert len(padded) == MIB
    response = api.request("POST", "/v1/images", org, [WRITE], content=padded)
    assert response.status_code == 201, response.text


def test_a_413_leaves_the_connection_usable_or_says_it_closes(server: LiveServer) -> None:
    """A moderately oversized body is read and dropped, so the 413 arrives and the connection can carry the
    next request; one beyond what the server will drain (16 MiB) is answered with Connection: close."""
    api = Api(server)
    org = uuid.uuid4()
    headers = api.headers(org, [WRITE])
    outcomes = []
    for size, ends in ((2 * MIB, False), (20 * MIB, True)):
        big = b'{"idc": "' + b"x" * size + b'"}'
        for _ in range(3):
            with httpx.Client(base_url=server.url, timeout=10, headers=headers) as client:
                try:
                    response = client.post("/v1/images", content=chunks(big)())
                except httpx.TransportError as exc:  # the server stopped reading a 20 MiB upload
                    outcomes.append((ends, type(exc).__name__))
                    continue
                try:
                    after: int | str = client.get("/v1/images").status_code
                except httpx.TransportError as exc:
                    after = type(exc).__name__
                closes = response.headers.get("connection") == "close"
                outcomes.append((ends, response.status_code, closes, after if not closes else 200))
    assert [o for o in outcomes if not o[0]] == [(False, 413, False, 200)] * 3
    assert all(
        o[1:] == (413, True, 200) or o[1] in ("WriteError", "RemoteProtocolError") for o in outcomes if o[0]
    )


# -------------------------------------------------------------------------------------------- validation


def test_create_validation_reports_every_problem(server: LiveServer) -> None:
    api = Api(server)
    org = uuid.uuid4()

    def post(body: Any) -> httpx.Response:
        return api.create(org, [WRITE], body)

    def raw(content: bytes) -> httpx.Response:
        return api.request(
            "POST", "/v1/images", org, [WRITE], content=content, headers={"Content-Type": "application/json"}
        )

    with api.unchanged(org):
        # Each required field missing, or null: one "required" detail each.
        assert sorted(details(post({}))) == sorted((f, "required") for f in REQUIRED_FIELDS)
        for name in REQUIRED_FIELDS:
            without = {k: v for k, v in image_body(org).items() if k != name}
            assert details(post(without)) == [(name, "required")], name
            assert details(post(image_body(org, **{name: None}))) == [(name, "required")], name

        cases: list[tuple[dict[str, Any], list[tuple[str, str]]]] = [
            ({"idc": "us west"}, [("idc", "pattern")]),
            ({"idc": ""}, [("idc", "pattern")]),
            ({"idc": "a" * 51}, [("idc", "max")]),
            ({"idc": "us-west-1\n"}, [("idc", "pattern")]),
            ({"name": "-ubuntu"}, [("name", "pattern")]),
            ({"name": "ubuntu "}, [("name", "pattern")]),
            ({"name": "a" * 256}, [("name", "max")]),
            ({"supportedProducts": ["gpu.h100", "gpu/h100"]}, [("supportedProducts[1]", "pattern")]),
            ({"supportedProducts": ["p" * 257]}, [("supportedProducts[0]", "max")]),
            ({"supportedProducts": "gpu.h100"}, [("supportedProducts", "type")]),
            ({"supportedProducts": [1]}, [("supportedProducts[0]", "type")]),
            ({"BootMode": "BIOS"}, [("BootMode", "oneof")]),
            ({"BootMode": "uefi"}, [("BootMode", "oneof")]),
            ({"icon": "not a uri"}, [("icon", "uri")]),
            ({"icon": "/relative/icon.svg"}, [("icon", "uri")]),
            ({"orgId": "not-a-uuid"}, [("orgId", "uuid")]),
            ({"orgId": str(org)[:35]}, [("orgId", "uuid")]),
            ({"DefaultPartitionTable": []}, [("DefaultPartitionTable", "min")]),
            ({"DefaultPartitionTable": {}}, [("DefaultPartitionTable", "type")]),
            ({"DefaultPartitionTable": ["root"]}, [("DefaultPartitionTable[0]", "type")]),
            (
                {"DefaultPartitionTable": [{"name": "root"}]},
                [
                    ("DefaultPartitionTable[0].mountPoint", "required"),
                    ("DefaultPartitionTable[0].size", "required"),
                    ("DefaultPartitionTable[0].fileSystem", "required"),
                ],
            ),
            (
                {
                    "DefaultPartitionTable": [
                        {"name": "EFI", "mountPoint": "/boot/efi", "size": "1G", "fileSystem": "vfat"},
                        {"name": "bad name!", "mountPoint": "", "size": "1G", "fileSystem": "e" * 257},
                    ]
                },
                [
                    ("DefaultPartitionTable[1].name", "pattern"),
                    ("DefaultPartitionTable[1].mountPoint", "required"),
                    ("DefaultPartitionTable[1].fileSystem", "max"),
                ],
            ),
            ({"idc": 5}, [("idc", "type")]),
            ({"path": []}, [("path", "type")]),
            ({"OSVersion": 22.04}, [("OSVersion", "type")]),
            ({"BootMode": True}, [("BootMode", "type")]),
            ({"orgId": 1}, [("orgId", "type")]),
            ({"type": "Private"}, [("type", "oneof")]),
            ({"type": 1}, [("type", "type")]),
            # several problems at once: one detail per problem, none left out
            (
                {"idc": "a b", "name": "", "BootMode": "BIOS", "icon": "nope", "orgId": "x", "type": "All"},
                [
                    ("idc", "pattern"),
                    ("orgId", "uuid"),
                    ("name", "pattern"),
                    ("BootMode", "oneof"),
                    ("icon", "uri"),
                    ("type", "oneof"),
                ],
            ),
        ]
        for overrides, expected in cases:
            assert sorted(details(post(image_body(org, **overrides)))) == sorted(expected), overrides

        # A body that is not an object, or not JSON at all.
        for content in (b"[]", json.dumps([image_body(org)]).encode(), b'"image"', b"5", b"null", b"true"):
            assert details(raw(content)) == [("body", "type")], content
        for content in (b"", b"{", b"{'idc': 'x'}", b"\xff\xfe", b'{"idc": "a"} trailing'):
            assert details(raw(content)) == [("body", "json")], content

    # Boundaries just inside the limits are accepted.
    accepted = api.create(
        org,
        [WRITE],
        image_body(org, idc="a" * 50, name="n" * 255, supportedProducts=["p" * 256], BootMode="Legacy"),
    )
    assert accepted.status_code == 201, accepted.text


# -------------------------------------------------------------------------------------------- duplicates


def test_duplicate_names_per_idc_and_owner_namespace(server: LiveServer) -> None:
    api = Api(server)
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    first = api.created(org_a, [WRITE], image_body(org_a, name="dup"))

    with api.unchanged(org_a, org_b):
        assert_reason(api.create(org_a, [WRITE], image_body(org_a, name="dup")), 409)
        # Everything else different, same (owner, idc, name): still a duplicate.
        other_fields = image_body(org_a, name="dup", path="x", OSVersion="24.04", supportedProducts=[])
        assert_reason(api.create(org_a, [WRITE], other_fields), 409)
        # An admin creating the same Customized image for org A collides the same way.
        assert_reason(api.create(org_b, [ADMIN], image_body(org_a, name="dup")), 409)

    # The same name in another idc, in another org, or as a Public image is a different identity.
    in_other_idc = api.created(org_a, [WRITE], image_body(org_a, name="dup", idc="us-east-2"))
    in_other_org = api.created(org_b, [WRITE], image_body(org_b, name="dup"))
    public = api.created(org_a, [ADMIN], image_body(org_a, name="dup", type="Public"))

    # All Public images share one namespace, whoever's orgId they carry.
    with api.unchanged(org_a, org_b):
        response = api.create(org_b, [ADMIN], image_body(org_b, name="dup", type="Public"))
        assert_reason(response, 409)
        assert (
            response.json()["reason"] == "an image with this name already exists in this idc for this owner"
        )
    other_public_idc = api.created(
        org_b, [ADMIN], image_body(org_b, name="dup", idc="us-east-2", type="Public")
    )

    assert api.ids(org_a) == [first["id"], in_other_idc["id"], public["id"], other_public_idc["id"]]
    assert api.ids(org_b) == [in_other_org["id"], public["id"], other_public_idc["id"]]

    # Once deleted, the name is free again.
    assert api.delete(org_a, [WRITE], first["id"]).status_code == 204
    again = api.created(org_a, [WRITE], image_body(org_a, name="dup"))
    assert again["id"] != first["id"]


# ------------------------------------------------------------------------------------------------ delete


def test_delete_scopes_and_hidden_images(server: LiveServer) -> None:
    api = Api(server)
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    own = api.created(org_a, [WRITE], image_body(org_a, name="own"))
    theirs = api.created(org_b, [WRITE], image_body(org_b, name="theirs"))
    public = api.created(org_b, [ADMIN], image_body(org_b, name="public", type="Public"))

    with api.unchanged(org_a, org_b):
        # Another org's Customized image is a 404 exactly like a random id, for write (and no scope: 403).
        assert_not_found_like_missing(api, api.delete(org_a, [WRITE], theirs["id"]), org_a, "DELETE")
        assert_not_found_like_missing(api, api.delete(org_b, [WRITE], own["id"]), org_b, "DELETE")
        assert_reason(api.delete(org_a, [], theirs["id"]), 403)
        # Visible but not changeable.
        assert_reason(api.delete(org_a, [], own["id"]), 403)
        assert_reason(api.delete(org_a, [WRITE], public["id"]), 403)
        assert_reason(api.delete(org_b, [WRITE], public["id"]), 403)  # not even by the org that published it
        # Missing, malformed, unauthenticated.
        assert_reason(api.delete(org_a, [ADMIN], str(uuid.uuid4())), 404)
        assert details(api.delete(org_a, [WRITE], "not-a-uuid")) == [("id", "uuid")]
        response = api.http.delete(f"/v1/images/{own['id']}")
        assert response.status_code == 401 and response.json()["group"] == "auth_verify"

    # The owner org with images:write deletes its own Customized image.
    response = api.delete(org_a, [WRITE], own["id"])
    assert response.status_code == 204 and response.content == b""
    assert api.get(org_a, own["id"]).status_code == 404
    assert api.list(org_a) == [public]
    # Deleting it again is a plain 404.
    assert_not_found_like_missing(api, api.delete(org_a, [WRITE], own["id"]), org_a, "DELETE")

    # images:admin deletes Public images and any org's Customized ones (even one it cannot see).
    assert api.get(org_a, theirs["id"]).status_code == 404
    assert api.delete(org_a, [ADMIN], theirs["id"]).status_code == 204
    assert api.delete(org_a, [ADMIN], public["id"]).status_code == 204
    assert api.list(org_a) == [] and api.list(org_b) == []


# ------------------------------------------------------------------------------------------------- patch


def test_patch_merges_mutable_fields_and_is_read_back_at_once(server: LiveServer) -> None:
    api = Api(server)
    org = uuid.uuid4()
    image = api.created(org, [WRITE], image_body(org, name="base", supportedProducts=["gpu.h100.8x"]))

    response = api.patch(org, [WRITE], image["id"], {"name": "renamed", "supportedProducts": ["cpu.small"]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    patched = response.json()
    assert patched == {**image, "name": "renamed", "supportedProducts": ["cpu.small"]}
    # Read-your-writes: GET and every filter reflect the change immediately.
    assert api.get(org, image["id"]).json() == patched
    assert api.list(org) == [patched]
    assert api.ids(org, product="cpu.small") == [image["id"]]
    assert api.ids(org, product="gpu.h100.8x") == []
    assert api.ids(org, idc="us-west-1", product="cpu.small") == [image["id"]]

    # Every mutable field at once, as application/json; arrays are replaced whole.
    changes = {
        "name": "Rocky 9",
        "path": "images/rocky-9.qcow2",
        "OSSeries": "Rocky",
        "OSVersion": "9.4",
        "OSArchitecture": "aarch64",
        "BootMode": "Legacy",
        "SystemDiskSize": "100G",
        "DefaultPartitionTable": [{"name": "root", "mountPoint": "/", "size": "100G", "fileSystem": "xfs"}],
        "icon": "https://static.example.com/rocky.svg",
        "supportedProducts": ["gpu.l40s.4x", "cpu.small"],
    }
    assert set(changes) == set(MUTABLE_FIELDS)
    response = api.patch(org, [WRITE], image["id"], changes, content_type="application/json")
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched == {**image, **changes}
    assert api.list(org, product="gpu.l40s.4x") == [patched]

    # Read-only fields repeated with their current values are fine; unknown fields are ignored.
    same = {k: patched[k] for k in ("id", "type", "orgId", "idc", "createdAt")}
    response = api.patch(org, [WRITE], image["id"], {**same, "OSVersion": "9.5", "comment": "x"})
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["OSVersion"] == "9.5" and "comment" not in patched
    # An empty patch changes nothing and answers the image.
    response = api.patch(org, [WRITE], image["id"], {})
    assert response.status_code == 200 and response.json() == patched


def test_patch_rejections_leave_the_image_unchanged(server: LiveServer) -> None:
    api = Api(server)
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    own = api.created(org_a, [WRITE], image_body(org_a, name="own"))
    sibling = api.created(org_a, [WRITE], image_body(org_a, name="sibling"))
    theirs = api.created(org_b, [WRITE], image_body(org_b, name="theirs"))
    public = api.created(org_b, [ADMIN], image_body(org_b, name="public", type="Public"))

    with api.unchanged(org_a, org_b):
        # Read-only fields with a different value: 400 "readonly" for each.
        other = {
            "id": str(uuid.uuid4()),
            "type": "Public",
            "orgId": str(org_b),
            "idc": "us-east-2",
            "createdAt": "2020-01-01T00:00:00Z",
        }
        for name, value in other.items():
            assert details(api.patch(org_a, [WRITE], own["id"], {name: value})) == [(name, "readonly")], name
        assert sorted(details(api.patch(org_a, [WRITE], own["id"], other))) == sorted(
            (name, "readonly") for name in other
        )
        # null removes a field in a merge patch: for a required field that is a 400.
        for name in MUTABLE_FIELDS:
            assert details(api.patch(org_a, [WRITE], own["id"], {name: None})) == [(name, "required")], name
        for name in ("idc", "orgId"):  # read-only as well as required
            found = details(api.patch(org_a, [WRITE], own["id"], {name: None}))
            assert (name, "required") in found, (name, found)
        # Invalid new values, and a patch that is not an object or not JSON.
        assert details(api.patch(org_a, [WRITE], own["id"], {"BootMode": "BIOS"})) == [("BootMode", "oneof")]
        assert details(api.patch(org_a, [WRITE], own["id"], {"name": "bad/name"})) == [("name", "pattern")]
        assert details(api.patch(org_a, [WRITE], own["id"], {"icon": "icon.svg"})) == [("icon", "uri")]
        assert details(api.patch(org_a, [WRITE], own["id"], {"DefaultPartitionTable": []})) == [
            ("DefaultPartitionTable", "min")
        ]
        assert details(api.patch(org_a, [WRITE], own["id"], {"supportedProducts": ["a b"]})) == [
            ("supportedProducts[0]", "pattern")
        ]
        assert details(api.patch(org_a, [WRITE], own["id"], {"OSVersion": 9})) == [("OSVersion", "type")]
        assert details(api.patch(org_a, [WRITE], own["id"], [{"op": "replace"}])) == [("body", "type")]
        response = api.request(
            "PATCH", f"/v1/images/{own['id']}", org_a, [WRITE], content=b"{", headers=MERGE_PATCH
        )
        assert details(response) == [("body", "json")]
        assert details(api.patch(org_a, [WRITE], "nope", {"OSVersion": "1"})) == [("id", "uuid")]
        # A rename onto an existing name (same owner, same idc) is a conflict.
        assert_reason(api.patch(org_a, [WRITE], own["id"], {"name": "sibling"}), 409)
        # Scopes: hidden → 404 like a random id; visible but not the caller's → 403; no scope → 403.
        assert_not_found_like_missing(
            api, api.patch(org_a, [WRITE], theirs["id"], {"OSVersion": "1"}), org_a, "PATCH"
        )
        assert_not_found_like_missing(
            api, api.patch(org_a, [WRITE], theirs["id"], {"orgId": str(org_a)}), org_a, "PATCH"
        )
        assert_not_found_like_missing(
            api, api.patch(org_a, [WRITE], str(uuid.uuid4()), {"OSVersion": "1"}), org_a, "PATCH"
        )
        assert_reason(api.patch(org_a, [WRITE], public["id"], {"OSVersion": "1"}), 403)
        assert_reason(api.patch(org_b, [WRITE], public["id"], {"OSVersion": "1"}), 403)
        assert_reason(api.patch(org_a, [], own["id"], {"OSVersion": "1"}), 403)
        response = api.http.patch(f"/v1/images/{own['id']}", json={"OSVersion": "1"})
        assert response.status_code == 401 and response.json()["group"] == "auth_verify"

    # images:admin may change Public images and any org's images (even ones it cannot see).
    response = api.patch(org_a, [ADMIN], public["id"], {"OSVersion": "24.04"})
    assert response.status_code == 200 and response.json() == {**public, "OSVersion": "24.04"}
    response = api.patch(org_a, [ADMIN], theirs["id"], {"name": "renamed-by-admin"})
    assert response.status_code == 200 and response.json() == {**theirs, "name": "renamed-by-admin"}
    assert api.get(org_a, theirs["id"]).status_code == 404  # still hidden from org A
    # A rename onto a name used in another namespace or idc is fine.
    response = api.patch(org_a, [WRITE], own["id"], {"name": "theirs"})
    assert response.status_code == 200
    response = api.patch(org_b, [ADMIN], public["id"], {"name": "sibling"})
    assert response.status_code == 200
    assert api.ids(org_a) == [own["id"], sibling["id"], public["id"]]
    assert [i["name"] for i in api.list(org_b)] == ["renamed-by-admin", "sibling"]


# ------------------------------------------------------------------------------------------------- audit


def test_audit_trail_records_every_write(server: LiveServer) -> None:
    api = Api(server)
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)

    alice = api.created(org_a, [WRITE], image_body(org_a, name="alice-image"), subject="alice")
    anonymous = api.created(org_b, [WRITE], image_body(org_b, name="no-subject"))
    public = api.created(org_b, [ADMIN], image_body(org_b, name="published", type="Public"), subject="bob")
    response = api.patch(org_a, [WRITE], alice["id"], {"OSVersion": "24.04"}, subject="alice")
    assert response.status_code == 200
    # Rejected writes leave no trace.
    assert (
        api.create(org_a, [WRITE], image_body(org_a, name="alice-image"), subject="alice").status_code == 409
    )
    assert api.delete(org_a, [WRITE], public["id"], subject="alice").status_code == 403
    assert api.patch(org_a, [WRITE], alice["id"], {"idc": "x"}, subject="alice").status_code == 400
    # A patch that changes nothing is not a change.
    assert api.patch(org_a, [WRITE], alice["id"], {"OSVersion": "24.04"}, subject="alice").status_code == 200
    assert api.delete(org_a, [ADMIN], anonymous["id"], subject="carol").status_code == 204
    imported_id = str(uuid.uuid4())
    server.import_catalog([{**image_body(org_b, name="from-file"), "id": imported_id, "type": "Public"}])

    rows = api.audit()
    assert [(r["action"], r["imageId"], r["actorOrg"], r["actor"]) for r in rows] == [
        ("create", alice["id"], str(org_a), "alice"),
        ("create", anonymous["id"], str(org_b), None),
        ("create", public["id"], str(org_b), "bob"),
        ("update", alice["id"], str(org_a), "alice"),
        ("delete", anonymous["id"], str(org_a), "carol"),
        ("create", imported_id, None, "cli:catalog-import"),
    ]
    create, _, _, update, delete, imported = rows
    assert create["changes"] == alice  # a create records the whole new image
    assert update["changes"] == {"OSVersion": {"from": "22.04", "to": "24.04"}}
    assert delete["changes"] == anonymous  # a delete records what was removed
    assert imported["changes"]["name"] == "from-file" and imported["changes"]["type"] == "Public"
    revisions = [r["revision"] for r in rows]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    times = [dt.datetime.fromisoformat(r["at"]) for r in rows]
    assert times == sorted(times) and all(start <= t <= dt.datetime.now(dt.UTC) for t in times)

    # --image: only that image's changes.
    assert [r["action"] for r in api.audit("--image", alice["id"])] == ["create", "update"]
    assert [r["action"] for r in api.audit("--image", anonymous["id"])] == ["create", "delete"]

    # --since: changes at or after a time (whole seconds, UTC by default).
    cut = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).replace(microsecond=0)
    time.sleep(max(0.0, (cut - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    late = api.created(org_a, [WRITE], image_body(org_a, name="late"), subject="alice")
    since = api.audit("--since", cut.strftime("%Y-%m-%dT%H:%M:%S"))
    assert [(r["action"], r["imageId"]) for r in since] == [("create", late["id"])]


def test_audit_since_with_an_offset(server: LiveServer) -> None:
    api = Api(server)
    org = uuid.uuid4()
    image = api.created(org, [WRITE], image_body(org))
    now = dt.datetime.now(dt.UTC)
    east, west = dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-5))
    minute_ago = (now - dt.timedelta(minutes=1)).astimezone(east).strftime("%Y-%m-%dT%H:%M:%S%z")
    in_a_minute = (now + dt.timedelta(minutes=1)).astimezone(west).strftime("%Y-%m-%dT%H:%M:%S%z")
    found = [api.audit("--since", minute_ago), api.audit("--since", in_a_minute)]
    assert [[r["imageId"] for r in rows] for rows in found] == [[image["id"]], []]


# ---------------------------------------------------------------------------------------- export/import


def test_export_round_trips_and_prune(server: LiveServer) -> None:
    api = Api(server)
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    files = [
        {**image_body(org_a, name=f"file-{i}", idc="eu-1"), "id": str(uuid.uuid4()), "type": "Public"}
        for i in range(2)
    ]
    files[0]["createdAt"] = "2024-05-01T12:00:00.123456Z"
    assert "created 2" in server.import_catalog(files)
    public = api.created(org_a, [ADMIN], image_body(org_a, name="public", type="Public"))
    custom_a = api.created(org_a, [WRITE], image_body(org_a, name="custom-a"))
    custom_b = api.created(org_b, [WRITE], image_body(org_b, name="custom-b", BootMode="Legacy"))
    served = {i["id"]: i for org in (org_a, org_b) for i in api.list(org)}
    assert len(served) == 5

    # JSON export: exactly the served images (ids and createdAt kept), in list order.
    exported = json.loads(server.cli("catalog", "export", "-o", "json").stdout)
    assert exported == sorted(served.values(), key=sort_key)
    assert exported[0]["id"] == files[0]["id"] and exported[0]["createdAt"] == files[0]["createdAt"]

    # The YAML export (the default) re-imports as all unchanged.
    path = server.data_dir / "export.yaml"
    path.write_text(server.cli("catalog", "export").stdout)
    report = json.loads(server.cli("catalog", "import", str(path), "-o", "json").stdout)
    assert report == {"created": 0, "updated": 0, "unchanged": 5, "dryRun": False, "revision": None}

    # --type Public
    only_public = json.loads(server.cli("catalog", "export", "-o", "json", "--type", "Public").stdout)
    assert [i["id"] for i in only_public] == [i["id"] for i in exported if i["type"] == "Public"]
    assert len(only_public) == 3

    # --prune deletes the Public images missing from the file; Customized images are never pruned.
    path.write_text(json.dumps([only_public[0]]))
    before = api.state([org_a, org_b])
    report = json.loads(
        server.cli("catalog", "import", str(path), "--prune", "--dry-run", "-o", "json").stdout
    )
    assert report["deleted"] == 2 and report["unchanged"] == 1 and report["dryRun"] is True
    server.wait_synced()
    assert api.state([org_a, org_b]) == before  # a dry run deletes nothing
    report = json.loads(server.cli("catalog", "import", str(path), "--prune", "-o", "json").stdout)
    assert report["deleted"] == 2 and report["unchanged"] == 1 and report["dryRun"] is False
    server.wait_synced()
    assert api.ids(org_a) == [files[0]["id"], custom_a["id"]]
    assert api.ids(org_b) == [files[0]["id"], custom_b["id"]]
    assert api.get(org_a, public["id"]).status_code == 404
    deletes = [r for r in api.audit() if r["action"] == "delete"]
    assert {r["imageId"] for r in deletes} == {files[1]["id"], public["id"]}
    assert {r["actor"] for r in deletes} == {"cli:catalog-import"}
