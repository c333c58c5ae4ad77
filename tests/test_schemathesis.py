"""Schemathesis against a real server: (a) the given contract file, (b) the document the server serves.

Every operation runs schemathesis's default phases (examples, coverage, fuzzing) in both generation modes
(positive and negative) with the built-in checks: no 5xx, documented status codes, content types, headers
and bodies conforming to the schema, schema-invalid requests rejected, valid ones accepted, authentication
enforced, unsupported methods answered with 405.

(a) and the read operations of (b) run against the shared, read-only ``demo_server`` with a demo-org
token. The write operations of (b) run with an ``images:write images:admin`` token against a private server
holding its own copy of the demo catalog, where they really create, patch and delete.

Deliberate adjustments, all about what the documents say rather than about the service:

* ``allow-extra-parameters = false``: schemathesis would otherwise send undeclared query parameters as
  "negative" data and expect a 4xx, but the served document states that unknown query parameters are
  ignored (and the contract is silent, which OpenAPI does not read as "forbidden").
* For the contract file only, a 400 answer to a request whose query the contract itself calls invalid is
  accepted although the contract lists no 400 (the served document adds it as ``BadRequest``); its body
  must still be an ``errorStatusMessage`` and all other checks still apply.
* ``cursor`` is opaque ("taken from a previous page's Link header"): a 400 about a cursor the server never
  issued is accepted for a schema-valid query.

The served document is loaded from ``cluster_engine.server.openapi.document()`` at import time (schemathesis
needs the schema at collection time; its fixture-based loader is broken on pytest 9, which no longer has
``Node._nodeid``); ``test_served_document_is_what_we_fuzz`` proves it is the document served over HTTP.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import jsonschema
import pytest
import schemathesis
import yaml
from hypothesis import strategies as st
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    positive_data_acceptance,
    status_code_conformance,
)

from cluster_engine.cli.main import DEMO_ORG, demo_catalog
from cluster_engine.server import openapi
from cluster_engine.testing import LiveServer

from .conftest import STORES, Databases, serve
from .test_contract import is_uuid

CONTRACT_PATH = (
    Path(__file__).resolve().parents[1] / "src" / "cluster_engine" / "contract" / "list-images.openapi.yaml"
)
MAX_EXAMPLES = 300
# Writes cost a database transaction each and run on both stores: half as many per store keeps the module
# within its time budget while each write operation still gets 300 fuzzed examples in all.
MAX_WRITE_EXAMPLES = 150
SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
WRITE_SETTINGS = hypothesis.settings(SETTINGS, max_examples=MAX_WRITE_EXAMPLES)
WRITES = ["DELETE", "PATCH", "POST", "PUT"]
WRITE_SCOPES = ["images:write", "images:admin"]
KNOWN_IDS = [entry["id"] for entry in demo_catalog()]
KNOWN_BUGS: list[Any] = []  # checks to leave out while a reported bug is open (none now)
# Coverage-phase cases are built at collection time, before any server (and so any token) exists: the auth
# provider puts this placeholder in, and each test swaps in a real token for the server it talks to.
PLACEHOLDER = "Bearer placeholder-for-a-real-token"
# (schema, store, operation, phase, mode) → examples sent; the same with the status they got
COUNTS: collections.Counter[tuple[str, str, str, str, str]] = collections.Counter()
STATUSES: collections.Counter[tuple[str, str, str, str, str, int]] = collections.Counter()


class PlaceholderToken:
    """Marks generated requests as authenticated (schemathesis leaves it out where it tests missing auth)."""

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return PLACEHOLDER

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers["Authorization"] = data


def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> Any:
    """Random UUIDs never name an image: swap a valid id for a demo catalog id half of the time."""
    if path_parameters and is_uuid(path_parameters.get("id")):
        known = st.sampled_from(KNOWN_IDS).map(lambda image_id: {**path_parameters, "id": image_id})
        return st.just(path_parameters) | known
    return st.just(path_parameters)


def load(source: Path | dict[str, Any], **generation: Any) -> Any:
    config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False, **generation}})
    if isinstance(source, Path):
        schema = schemathesis.openapi.from_path(source, config=config)
    else:
        schema = schemathesis.openapi.from_dict(source, config=config)
    schema.auth()(PlaceholderToken)
    schema.hook(flatmap_path_parameters)
    return schema


contract_schema = load(CONTRACT_PATH)
served_reads = load(openapi.document()).exclude(method=WRITES)
served_writes = load(openapi.document()).include(method=WRITES)


@pytest.fixture(scope="module")
def token(demo_server: LiveServer) -> str:
    return f"Bearer {demo_server.token(DEMO_ORG)}"


@pytest.fixture(scope="module", params=STORES)
def writable_server(
    request: pytest.FixtureRequest, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A private server with its own copy of the demo catalog, for the write operations to change."""
    yield from serve(request, databases, tmp_path_factory.mktemp("fuzz-writes"), "--demo")


def credentials(case: schemathesis.Case, token: str) -> dict[str, str] | None:
    """The real token where the auth provider put the placeholder (never where schemathesis removed it)."""
    if case.headers is not None and case.headers.get("Authorization") == PLACEHOLDER:
        return {"Authorization": token}
    return None


def record(schema: str, server: LiveServer, case: schemathesis.Case, status: int) -> None:
    assert case.meta is not None
    store = server.env["CE_DATABASE_URL"].split(":")[0].split("+")[0]
    key = (
        schema,
        store,
        f"{case.method} {case.path}",
        case.meta.phase.name.value,
        case.meta.generation.mode.value,
    )
    COUNTS[key] += 1
    STATUSES[(*key, status)] += 1


def contract_validator(name: str) -> jsonschema.Draft4Validator:
    contract = yaml.safe_load(CONTRACT_PATH.read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resource(
        "urn:contract", Resource.from_contents(contract, default_specification=DRAFT4)
    )
    return jsonschema.Draft4Validator({"$ref": f"urn:contract#/components/schemas/{name}"}, registry=registry)


ERROR_STATUS_MESSAGE = contract_validator("errorStatusMessage")


@contract_schema.parametrize()
@SETTINGS
def test_contract_file(case: schemathesis.Case, demo_server: LiveServer, token: str) -> None:
    headers = credentials(case, token)
    response = case.call(base_url=demo_server.url, headers=headers)
    # The service also serves the documented extensions (POST on /v1/images), which a 405's Allow header
    # rightly names; the contract file alone doesn't know them. The served-document runs check Allow.
    excluded = [*KNOWN_BUGS, allow_header_conformance]
    if response.status_code == 400:
        # Not in the contract's list, but the right answer to a query the contract's own schema rejects.
        assert case.meta is not None and case.meta.is_negative_at(ParameterLocation.QUERY), (
            f"400 for a query the contract allows: {case.as_curl_command()}\n{response.text}"
        )
        ERROR_STATUS_MESSAGE.validate(response.json())
        excluded.append(status_code_conformance)
    case.validate_response(
        response, excluded_checks=excluded, headers=headers, transport_kwargs={"base_url": demo_server.url}
    )
    record("contract", demo_server, case, response.status_code)


def forged_cursor_rejected(case: schemathesis.Case, response: Any) -> bool:
    """Whether a 400 is only about `cursor`, which the served document calls opaque ("taken from a previous
    page's Link header"): a string the server never issued is rightly refused, schema-valid or not."""
    if response.status_code != 400 or not case.query or "cursor" not in case.query:
        return False
    details = response.json().get("validationDetail") or []
    return bool(details) and all(detail.get("field") == "cursor" for detail in details)


@served_reads.parametrize()
@SETTINGS
def test_served_document_reads(case: schemathesis.Case, demo_server: LiveServer, token: str) -> None:
    headers = credentials(case, token)
    response = case.call(base_url=demo_server.url, headers=headers)
    excluded = list(KNOWN_BUGS)
    if forged_cursor_rejected(case, response):
        excluded.append(positive_data_acceptance)
    case.validate_response(
        response, excluded_checks=excluded, headers=headers, transport_kwargs={"base_url": demo_server.url}
    )
    record("served", demo_server, case, response.status_code)


@served_writes.parametrize()
@WRITE_SETTINGS
def test_served_document_writes(case: schemathesis.Case, writable_server: LiveServer) -> None:
    token = f"Bearer {writable_server.token(DEMO_ORG, scopes=WRITE_SCOPES)}"
    response = case.call_and_validate(
        base_url=writable_server.url, headers=credentials(case, token), excluded_checks=KNOWN_BUGS
    )
    record("served", writable_server, case, response.status_code)


def test_served_document_is_what_we_fuzz(demo_server: LiveServer) -> None:
    assert httpx.get(f"{demo_server.url}/openapi.json", timeout=10).json() == openapi.document()


def test_fuzzing_ran_a_few_hundred_examples_per_operation() -> None:
    """Guards the runs above against silently generating next to nothing (skipped when they did not run)."""
    fuzzed: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (schema, store, operation, phase, _mode), count in COUNTS.items():
        if phase == "fuzzing" and "/v1/images" in operation:
            fuzzed[(schema, store, operation)] += count
    expected = {
        key: (MAX_WRITE_EXAMPLES if key[2].split()[0] in WRITES else MAX_EXAMPLES) // 2 for key in fuzzed
    }
    if not fuzzed:
        pytest.skip("the schemathesis tests did not run in this process")
    for key, count in sorted(COUNTS.items()):  # shown with `pytest -s`
        print(*key, count)
    for key, count in sorted(STATUSES.items()):
        print(*key, count)
    assert {key: count for key, count in fuzzed.items() if count < expected[key]} == {}
    # the fuzzer got past validation: real images were read, and created, changed and deleted
    statuses = {(schema, operation, status) for (schema, _, operation, _, _, status) in STATUSES}
    for schema, operation, status in [
        ("contract", "GET /v1/images", 200),
        ("served", "GET /v1/images", 200),
        ("served", "GET /v1/images/{id}", 200),
        ("served", "POST /v1/images", 201),
        ("served", "PATCH /v1/images/{id}", 200),
        ("served", "DELETE /v1/images/{id}", 204),
    ]:
        if any(key[0] == schema and key[2] == operation for key in fuzzed):
            assert (schema, operation, status) in statuses, (schema, operation, status)


# ------------------------------------------------------------------------------------------ known bugs


@pytest.mark.parametrize("path", ["/v1/images", "/v1/images/{id}"])
@pytest.mark.parametrize("method", ["OPTIONS", "PUT"])
def test_405_allow_header_lists_the_methods_of_the_resource(
    demo_server: LiveServer, token: str, path: str, method: str
) -> None:
    documented = {m.upper() for m in openapi.document()["paths"][path]} & {"GET", *WRITES}
    target = path.replace("{id}", KNOWN_IDS[0])
    response = httpx.request(
        method, f"{demo_server.url}{target}", headers={"Authorization": token}, timeout=10
    )
    assert response.status_code == 405
    allowed = {m.strip().upper() for m in response.headers["allow"].split(",")}
    assert allowed - {"HEAD", "OPTIONS"} == documented


def _create_body(**overrides: Any) -> dict[str, Any]:
    entry = {key: value for key, value in demo_catalog()[0].items() if key not in {"id", "createdAt"}}
    return {
        **entry,
        "type": "Customized",
        "orgId": str(DEMO_ORG),
        "name": f"nul-{uuid.uuid4().hex[:8]}",
        **overrides,
    }


def test_strings_with_nul_are_treated_as_the_served_schema_says(writable_server: LiveServer) -> None:
    body = _create_body(OSSeries="Ubuntu\x00")
    document = openapi.document()
    registry: Registry[Any] = Registry().with_resource(
        "urn:served", Resource.from_contents(document, default_specification=DRAFT4)
    )
    schema = jsonschema.Draft4Validator(
        {"$ref": "urn:served#/components/schemas/ImageCreateBody"}, registry=registry
    )
    allowed = schema.is_valid(body)
    token = writable_server.token(DEMO_ORG, scopes=WRITE_SCOPES)
    response = httpx.post(
        f"{writable_server.url}/v1/images",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == (201 if allowed else 400), response.text
