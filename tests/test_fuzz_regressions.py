"""Regression tests for what the fuzzers (``python -m drills fuzz``) found.

Atheris, on ``drills/fuzz_targets.py``'s ``bodies`` target: a request body that is not valid UTF-8, or
that nests deeper than the decoder's recursion limit, made ``msgspec.json.decode`` raise
``UnicodeDecodeError`` or ``RecursionError`` rather than ``msgspec.DecodeError``; ``writes.read_json``
only caught the latter, so ``POST /v1/images`` and ``PATCH /v1/images/{id}`` answered 500 (with a
traceback in the log) instead of the contract's 400 "The body must be a JSON document." (fixed, found
at the same time by tests/test_security.py).

Atheris again, and a sweep over nesting depths against a server: a value nested just less deeply than
the decoder's limit is decoded, but then ``validation.original`` (the ``originalValue`` of a validation
detail) re-encoded it deeper in the stack and ``msgspec.json.encode`` raised ``RecursionError``, which
it didn't catch (and its ``repr`` fallback would raise it too): 500 again (fixed).

Schemathesis (5,000 examples per operation): ``PATCH /v1/images/{id}`` with ``{"type": {}}`` was valid
against the served ``ImagePatch`` schema (which didn't declare the immutable fields, and allows other
properties), but the service answers 400 ``readonly`` (``bodies.IMMUTABLE_FIELDS``): a schema-valid
request rejected (fixed: the document declares them ``readOnly``; the test passes however the two are
made to agree).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from cluster_engine.cli.main import DEMO_ORG, demo_catalog
from cluster_engine.server import bodies, openapi, writes
from cluster_engine.server.errors import RequestInvalid
from cluster_engine.testing import LiveServer
from cluster_engine.testing.requests import BodyRequest

NOT_UTF8 = b'{"name": "\xff"}'  # the fuzzer's was a create body with \xff bytes in "path"
SURROGATE = b'{"name": "\xed\xa0\x80"}'  # a UTF-8-encoded surrogate: not valid UTF-8 either
TOO_DEEP = b"[" * 5000 + b"]" * 5000  # 10 KB, far below the 1 MiB body limit
BODIES = {"not-utf8": NOT_UTF8, "surrogate": SURROGATE, "too-deep": TOO_DEEP}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_read_json_refuses_what_is_not_json_with_400(body: bytes) -> None:
    with pytest.raises(RequestInvalid) as raised:
        asyncio.run(writes.read_json(BodyRequest(body)))  # type: ignore[arg-type]
    assert [d.field for d in raised.value.details] == ["body"]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_writes_answer_400_to_bodies_that_are_not_json(
    demo_server: LiveServer, method: str, body: bytes
) -> None:
    # Refused before anything is looked up or written, so the shared demo server is left unchanged.
    target = "/v1/images" if method == "POST" else f"/v1/images/{demo_catalog()[0]['id']}"
    token = demo_server.token(DEMO_ORG, scopes=["images:write", "images:admin"])
    response = httpx.request(
        method,
        f"{demo_server.url}{target}",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert response.json()["validationDetail"][0]["field"] == "body"


def _nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    return value


def test_validators_report_deeply_nested_values_without_crashing() -> None:
    body = {
        **{k: v for k, v in demo_catalog()[0].items() if k not in {"id", "createdAt"}},
        "name": _nested(5000),
    }
    with pytest.raises(RequestInvalid) as raised:
        bodies.read_create_request(body)
    raised.value.body()  # what the service sends must encode
    assert [d.field for d in raised.value.details] == ["name"]


def test_bodies_nested_near_the_decoders_limit_answer_400(demo_server: LiveServer) -> None:
    token = demo_server.token(DEMO_ORG, scopes=["images:write"])
    answers = {}
    with httpx.Client(
        base_url=demo_server.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:
        for depth in range(850, 1050):
            for shape, body in {
                "list in a field": b'{"name":' + b"[" * depth + b"]" * depth + b"}",
                "object in a field": b'{"name":' * depth + b"1" + b"}" * depth,
            }.items():
                status = client.post("/v1/images", content=body).status_code
                if status != 400:
                    answers[(shape, depth)] = status
    assert answers == {}


def test_patch_bodies_the_served_schema_allows_are_not_refused(shared_server: LiveServer) -> None:
    server, org = shared_server, uuid.uuid4()  # an org of its own on the shared server
    document = openapi.document()
    registry: Registry[Any] = Registry().with_resource(
        "urn:served", Resource.from_contents(document, default_specification=DRAFT4)
    )
    schema = jsonschema.Draft4Validator(
        {"$ref": "urn:served#/components/schemas/ImagePatch"}, registry=registry
    )
    declared = document["components"]["schemas"]["ImagePatch"].get("properties", {})
    token = server.token(org, scopes=["images:write"])
    headers = {"Authorization": f"Bearer {token}"}
    entry = {k: v for k, v in demo_catalog()[0].items() if k not in {"id", "createdAt", "type"}}
    body = {**entry, "orgId": str(org), "name": "fuzz-regression"}
    created = httpx.post(f"{server.url}/v1/images", json=body, headers=headers, timeout=10)
    assert created.status_code == 201, created.text
    refused = {}
    for field, value in [("type", {}), ("id", 1), ("orgId", []), ("idc", "elsewhere-1"), ("createdAt", "x")]:
        if declared.get(field, {}).get("readOnly") or not schema.is_valid({field: value}):
            continue  # the document says not to send it, or that this value is invalid
        response = httpx.patch(
            f"{server.url}/v1/images/{created.json()['id']}",
            json={field: value},
            headers={**headers, "Content-Type": "application/merge-patch+json"},
            timeout=10,
        )
        if response.status_code == 400:
            refused[field] = response.json()["validationDetail"][0]["expression"]
    assert refused == {}
