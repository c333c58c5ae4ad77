"""The contract, checked from outside: the documents themselves, then real responses against their schemas.

The contract is the repository's verbatim copy (``src/cluster_engine/contract/list-images.openapi.yaml``);
the served document is fetched over HTTP from a running server. Response bodies are validated with
``jsonschema`` against schemas taken *by location* from those documents, so a ``$ref`` in the contract is
resolved exactly as the contract writes it, and ``format`` (uuid, date-time, uri) is asserted.

The shared ``demo_server`` is only read (writes are sent with a token lacking scopes, and refused); the
known-bug tests at the end that need writes use a fresh ``server``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from openapi_spec_validator import OpenAPIV30SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from cluster_engine.cli.main import demo_catalog
from cluster_engine.testing import LiveServer

CONTRACT_PATH = (
    Path(__file__).resolve().parents[1] / "src" / "cluster_engine" / "contract" / "list-images.openapi.yaml"
)
CONTRACT_URI = "urn:cluster-engine:contract"
SERVED_URI = "urn:cluster-engine:served"
LIST, GET = "/v1/images", "/v1/images/{id}"

DEMO = demo_catalog()
DEMO_IDCS = sorted({entry["idc"] for entry in DEMO})
DEMO_PRODUCTS = sorted({product for entry in DEMO for product in entry["supportedProducts"]})


# ------------------------------------------------------------------------------------------ format checks

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
# RFC 3986 §2: a URI holds unreserved, reserved and percent-encoded characters only
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


def is_uuid(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 36 or [value[i] for i in (8, 13, 18, 23)] != ["-"] * 4:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def is_date_time(value: object) -> bool:
    """RFC 3339 ``date-time``: full date, ``T``, full time with seconds, and a mandatory offset."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        return False
    try:
        dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def is_uri(value: object) -> bool:
    """An absolute URI (RFC 3986): a scheme, no characters the RFC excludes, and a host for http(s) (RFC 9110
    §4.2.1 forbids an http URI with an empty host)."""
    if not isinstance(value, str) or not _URI.fullmatch(value):
        return False
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return False
    if "#" in parts.fragment or any(
        c in part for c in "[]" for part in (parts.path, parts.query, parts.fragment)
    ):
        return False  # '#' starts the one fragment, brackets only delimit an IP literal in the authority
    return bool(parts.scheme) and (parts.scheme.lower() not in {"http", "https"} or bool(parts.hostname))


def format_checker() -> jsonschema.FormatChecker:
    """jsonschema's own checkers, plus stdlib ones for the formats whose checker needs a missing package."""
    checker = jsonschema.FormatChecker()
    for name, check in (("uuid", is_uuid), ("date-time", is_date_time), ("uri", is_uri)):
        if name not in checker.checkers:
            checker.checks(name)(check)
    return checker


FORMATS = format_checker()


@pytest.mark.parametrize(
    ("fmt", "good", "bad"),
    [
        (
            "uuid",
            "0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01",
            ["0b7e2f524c1a4d529a572f1c3c2d9e01", "not-a-uuid", ""],
        ),
        (
            "date-time",
            "2026-01-15T09:00:00Z",
            ["2026-01-15 09:00:00", "2026-01-15T09:00:00", "2026-13-01T00:00:00Z", "yesterday"],
        ),
        (
            "uri",
            "https://static.example.com/os-icons/ubuntu.svg?v=1#top",
            [
                "ubuntu.svg",
                "https://x/a b",
                "http://",
                "https://x/%zz",
                "https://x/ü",
                "https://x/{a}",
                "a:b#c#d",
                "",
            ],
        ),
    ],
)
def test_format_checker_is_not_vacuous(fmt: str, good: str, bad: list[str]) -> None:
    """Every format the contract uses is really checked (jsonschema skips formats it has no checker for)."""
    assert FORMATS.conforms(good, fmt)
    for value in bad:
        assert not FORMATS.conforms(value, fmt), value


# ------------------------------------------------------------------------------------------- documents


def load_contract() -> dict[str, Any]:
    data = yaml.safe_load(CONTRACT_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    return load_contract()


@pytest.fixture(scope="module")
def served(demo_server: LiveServer) -> dict[str, Any]:
    response = httpx.get(f"{demo_server.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert isinstance(document, dict)
    return document


def pointer(*parts: str) -> str:
    return "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def response_schema_pointer(document: dict[str, Any], path: str, status: int, method: str = "get") -> str:
    """Where the JSON schema of ``method path``'s ``status`` response is, following a response ``$ref``."""
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, f"{status} is not documented for {method.upper()} {path}"
    response = responses[str(status)]
    base = pointer("paths", path, method, "responses", str(status))
    if "$ref" in response:
        base = response["$ref"]
        response = resolve(document, base)
    assert "application/json" in response["content"], (
        f"{method.upper()} {path} {status} documents no JSON body"
    )
    return f"{base}/content/application~1json/schema"


class Schemas:
    """Validators for schemas located in the contract or the served document, ``$ref``s resolved in place."""

    def __init__(self, documents: dict[str, dict[str, Any]]) -> None:
        self.documents = documents
        self.registry: Registry[Any] = Registry().with_resources(
            (uri, Resource.from_contents(document, default_specification=DRAFT4))
            for uri, document in self.documents.items()
        )

    def validator(self, uri: str, ref: str) -> jsonschema.Draft4Validator:
        return jsonschema.Draft4Validator(
            {"$ref": f"{uri}{ref}"}, registry=self.registry, format_checker=FORMATS
        )

    def errors(self, uri: str, ref: str, instance: Any) -> list[str]:
        return [
            f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in self.validator(uri, ref).iter_errors(instance)
        ]

    def response_errors(
        self, uri: str, path: str, status: int, instance: Any, method: str = "get"
    ) -> list[str]:
        return self.errors(uri, response_schema_pointer(self.documents[uri], path, status, method), instance)


@pytest.fixture(scope="module")
def schemas(contract: dict[str, Any], served: dict[str, Any]) -> Schemas:
    return Schemas({CONTRACT_URI: contract, SERVED_URI: served})


def test_contract_file_is_valid_openapi_3_0(contract: dict[str, Any]) -> None:
    assert contract["openapi"].startswith("3.0.")
    validate(contract, cls=OpenAPIV30SpecValidator)


def test_served_document_is_valid_openapi_3_0(served: dict[str, Any], demo_server: LiveServer) -> None:
    assert served["openapi"].startswith("3.0.")
    validate(served, cls=OpenAPIV30SpecValidator)
    as_yaml = httpx.get(f"{demo_server.url}/openapi.yaml", timeout=10)
    assert as_yaml.status_code == 200
    assert yaml.safe_load(as_yaml.content) == served


def test_spec_validator_rejects_a_broken_document(contract: dict[str, Any]) -> None:
    """Guard against a vacuous validator: a dangling $ref and a response without description must fail."""
    broken = yaml.safe_load(yaml.safe_dump(contract))
    broken["paths"][LIST]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["items"] = {
        "$ref": "#/components/schemas/NoSuchSchema"
    }
    with pytest.raises(Exception):  # noqa: B017 - unresolvable refs surface as a referencing error
        validate(broken, cls=OpenAPIV30SpecValidator)
    broken = yaml.safe_load(yaml.safe_dump(contract))
    del broken["paths"][LIST]["get"]["responses"]["200"]["description"]
    with pytest.raises(OpenAPIValidationError):
        validate(broken, cls=OpenAPIV30SpecValidator)


def subset_mismatches(given: Any, served: Any, where: str = "") -> Iterator[str]:
    """Where ``given`` is not contained in ``served``.

    Objects may gain keys; lists may gain items after the given ones (what a deep merge appends), except
    ``enum``, which must stay exactly as given (a wider enum would let the service send values clients of
    the contract cannot know), and ``/servers``, where the service lists itself first (openapi.py) and
    every given server must still be there. Everything else must be equal.
    """
    if isinstance(given, dict):
        if not isinstance(served, dict):
            yield f"{where or '/'}: expected an object, served {served!r}"
            return
        for key, value in given.items():
            if key not in served:
                yield f"{where}/{key}: missing"
            else:
                yield from subset_mismatches(value, served[key], f"{where}/{key}")
    elif isinstance(given, list):
        if not isinstance(served, list):
            yield f"{where}: expected a list, served {served!r}"
        elif where.endswith("/enum") and given != served:
            yield f"{where}: enum changed from {given!r} to {served!r}"
        elif where == "/servers":
            yield from (f"{where}: {item!r} missing" for item in given if item not in served)
        elif len(served) < len(given):
            yield f"{where}: {len(given)} items given, {len(served)} served"
        else:
            for index, (item, served_item) in enumerate(zip(given, served, strict=False)):
                yield from subset_mismatches(item, served_item, f"{where}/{index}")
    elif type(given) is not type(served) or given != served:
        yield f"{where}: {given!r} given, {served!r} served"


def test_subset_check_is_not_vacuous(contract: dict[str, Any]) -> None:
    assert list(subset_mismatches(contract, contract)) == []
    changed = yaml.safe_load(yaml.safe_dump(contract))
    changed["components"]["schemas"]["idcName"]["maxLength"] = 51
    del changed["paths"][LIST]["get"]["responses"]["401"]
    changed["components"]["schemas"]["ImageResp"]["allOf"][1]["properties"]["type"]["enum"].append("Shared")
    changed["paths"][LIST]["get"]["parameters"].reverse()
    changed["servers"] = [{"url": "."}]
    problems = list(subset_mismatches(contract, changed))
    assert f"/servers: {contract['servers'][0]!r} missing" in problems
    assert "/components/schemas/idcName/maxLength: 50 given, 51 served" in problems
    assert f"/paths/{LIST}/get/responses/401: missing" in problems
    assert any(p.startswith("/components/schemas/ImageResp/allOf/1/properties/type/enum") for p in problems)
    assert any(p.startswith(f"/paths/{LIST}/get/parameters/0/") for p in problems)
    assert list(subset_mismatches({"a": [1], "b": 1}, {"a": [1, 2], "b": 1, "c": 3})) == []


def test_contract_is_a_subset_of_the_served_document(
    contract: dict[str, Any], served: dict[str, Any]
) -> None:
    assert list(subset_mismatches(contract, served)) == []
    # spelled out, the pieces clients depend on (each may gain keys, never change one)
    for path, operations in contract["paths"].items():
        for method, operation in operations.items():
            served_operation = served["paths"][path][method]
            assert served_operation["operationId"] == operation["operationId"]
            assert served_operation["parameters"][: len(operation["parameters"])] == operation["parameters"]
            assert set(operation["responses"]) <= set(served_operation["responses"])
    for section in ("schemas", "responses", "securitySchemes"):
        for name, definition in contract["components"][section].items():
            assert list(subset_mismatches(definition, served["components"][section][name])) == [], name
    assert served["security"] == contract["security"]


# ------------------------------------------------------------------------------------------ responses


def bearer(server: LiveServer, org: uuid.UUID, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(org, **kwargs)}"}


def list_queries() -> Iterator[dict[str, str]]:
    yield {}
    for idc in [*DEMO_IDCS, "nowhere"]:
        yield {"idc": idc}
    for product in [*DEMO_PRODUCTS, "gpu.none"]:
        yield {"product": product}
    for idc, product in itertools.product(DEMO_IDCS, DEMO_PRODUCTS):
        yield {"idc": idc, "product": product}


def image_property_names(document: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """Every property ImageResp declares, through its allOf chain."""
    if "$ref" in schema:
        return image_property_names(document, resolve(document, schema["$ref"]))
    names = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        names |= image_property_names(document, part)
    return names


@pytest.fixture(params=["demo", "other"])
def org(request: pytest.FixtureRequest, demo_org: uuid.UUID, other_org: uuid.UUID) -> uuid.UUID:
    return demo_org if request.param == "demo" else other_org


def test_every_list_response_matches_the_contract(
    demo_server: LiveServer, schemas: Schemas, contract: dict[str, Any], org: uuid.UUID
) -> None:
    declared = image_property_names(contract, {"$ref": "#/components/schemas/ImageResp"})
    problems: dict[str, list[str]] = {}
    validated = 0
    with httpx.Client(base_url=demo_server.url, headers=bearer(demo_server, org), timeout=10) as client:
        for query in list_queries():
            response = client.get(LIST, params=query)
            label = urllib.parse.urlencode(query) or "<no query>"
            assert response.status_code == 200, (label, response.text)
            assert response.headers["content-type"] == "application/json", label
            body = response.json()
            errors = schemas.response_errors(CONTRACT_URI, LIST, 200, body)
            errors += schemas.response_errors(SERVED_URI, LIST, 200, body)
            # the contract allows additional properties, but nothing undocumented should leak out
            errors += [
                f"{i}: undocumented {sorted(set(image) - declared)}"
                for i, image in enumerate(body)
                if set(image) - declared
            ]
            if errors:
                problems[label] = errors
            validated += len(body)
    assert problems == {}
    assert validated > len(DEMO_IDCS)  # the filters really returned images to validate


def selected(image: dict[str, Any], query: dict[str, str]) -> bool:
    return image["idc"] == query.get("idc", image["idc"]) and (
        "product" not in query or query["product"] in image["supportedProducts"]
    )


@pytest.mark.parametrize("limit", [1, 7])
def test_every_page_matches_the_contract(
    demo_server: LiveServer, schemas: Schemas, org: uuid.UUID, limit: int
) -> None:
    """Opt-in pagination (served document only): every page is a contract response, and the pages add up."""
    if "limit" not in {p["name"] for p in schemas.documents[SERVED_URI]["paths"][LIST]["get"]["parameters"]}:
        pytest.skip("the served document documents no pagination")
    with httpx.Client(base_url=demo_server.url, headers=bearer(demo_server, org), timeout=10) as client:
        whole = client.get(LIST).json()
        for query in [{}, {"idc": DEMO_IDCS[0]}, {"product": DEMO_PRODUCTS[0]}]:
            pages: list[dict[str, Any]] = []
            url: str | None = f"{LIST}?{urllib.parse.urlencode({**query, 'limit': limit})}"
            while url is not None:
                response = client.get(url)
                assert response.status_code == 200, response.text
                page = response.json()
                assert 0 < len(page) <= limit or (not pages and page == [])
                assert schemas.response_errors(CONTRACT_URI, LIST, 200, page) == []
                assert schemas.response_errors(SERVED_URI, LIST, 200, page) == []
                pages += page
                link = response.headers.get("link")
                match = re.fullmatch(r'<([^>]+)>; rel="next"', link) if link else None
                assert link is None or match, link
                url = match.group(1) if match else None
                assert len(pages) <= len(whole)
            assert pages == [image for image in whole if selected(image, query)]


def test_every_image_by_id_matches_the_contract(
    demo_server: LiveServer, schemas: Schemas, org: uuid.UUID
) -> None:
    with httpx.Client(base_url=demo_server.url, headers=bearer(demo_server, org), timeout=10) as client:
        listed = client.get(LIST).json()
        assert listed
        for image in listed:
            response = client.get(f"/v1/images/{image['id']}")
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
            body = response.json()
            assert schemas.errors(CONTRACT_URI, pointer("components", "schemas", "ImageResp"), body) == []
            assert schemas.response_errors(SERVED_URI, GET, 200, body) == []
            assert body == image
            upper = client.get(f"/v1/images/{image['id'].upper()}")
            assert upper.status_code == 200 and upper.json() == body


CUSTOMIZED_ID = next(entry["id"] for entry in DEMO if entry["type"] == "Customized")
PUBLIC_ID = next(entry["id"] for entry in DEMO if entry["type"] == "Public")


def create_body(org: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    entry = {key: value for key, value in DEMO[0].items() if key not in {"id", "createdAt"}}
    return {
        **entry,
        "type": "Customized",
        "orgId": str(org),
        "name": f"image-{uuid.uuid4().hex[:8]}",
        **overrides,
    }


# (id, method, operation, expected status, request path, credentials); writes are refused, so the shared
# demo server never changes
ERROR_CASES = [
    ("list-no-token", "get", LIST, 401, LIST, None),
    ("list-not-bearer", "get", LIST, 401, LIST, "basic"),
    ("list-garbage-token", "get", LIST, 401, LIST, "garbage"),
    ("list-expired-token", "get", LIST, 401, LIST, "expired"),
    ("list-bad-idc", "get", LIST, 400, f"{LIST}?idc=us%20west", "demo"),
    ("list-long-product", "get", LIST, 400, f"{LIST}?product={'p' * 257}", "demo"),
    ("list-two-bad-fields", "get", LIST, 400, f"{LIST}?idc=a%2Fb&product=", "demo"),
    ("list-idc-twice", "get", LIST, 400, f"{LIST}?idc=a&idc=b", "demo"),
    ("get-no-token", "get", GET, 401, f"{LIST}/{PUBLIC_ID}", None),
    ("get-expired-token", "get", GET, 401, f"{LIST}/{PUBLIC_ID}", "expired"),
    ("get-malformed-id", "get", GET, 400, f"{LIST}/not-a-uuid", "demo"),
    ("get-missing", "get", GET, 404, f"{LIST}/{uuid.uuid4()}", "demo"),
    ("get-other-orgs-customized", "get", GET, 404, f"{LIST}/{CUSTOMIZED_ID}", "other"),
    ("create-no-token", "post", LIST, 401, LIST, None),
    ("create-without-scope", "post", LIST, 403, LIST, "demo"),
    ("patch-without-scope", "patch", GET, 403, f"{LIST}/{CUSTOMIZED_ID}", "demo"),
    ("delete-without-scope", "delete", GET, 403, f"{LIST}/{CUSTOMIZED_ID}", "demo"),
]


def credentials(server: LiveServer, kind: str | None, demo: uuid.UUID, other: uuid.UUID) -> dict[str, str]:
    return {
        None: {},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "garbage": {"Authorization": "Bearer not.a.jwt"},
        "expired": bearer(server, demo, ttl=-60),
        "demo": bearer(server, demo),  # no scopes: may read, never write
        "other": bearer(server, other),
    }[kind]


# The schema each error body must match in the *contract* (which names them even where it lists no status).
CONTRACT_ERROR_SCHEMA = {
    400: pointer("components", "schemas", "errorStatusMessage"),
    401: pointer("components", "responses", "Unauthorized", "content", "application/json", "schema"),
    403: pointer("components", "schemas", "error"),
    404: pointer("components", "schemas", "error"),
}


@pytest.mark.parametrize(
    ("method", "path", "status", "target", "auth"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_bodies_match_the_contract(
    demo_server: LiveServer,
    schemas: Schemas,
    demo_org: uuid.UUID,
    other_org: uuid.UUID,
    method: str,
    path: str,
    status: int,
    target: str,
    auth: str | None,
) -> None:
    headers = credentials(demo_server, auth, demo_org, other_org)
    body = {"post": create_body(demo_org), "patch": {"OSVersion": "24.04"}}.get(method)
    response = httpx.request(method, f"{demo_server.url}{target}", headers=headers, json=body, timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert schemas.errors(CONTRACT_URI, CONTRACT_ERROR_SCHEMA[status], error) == []
    assert schemas.response_errors(SERVED_URI, path, status, error, method) == []
    if (method, path, status) == ("get", LIST, 401):  # the one error the contract itself lists
        assert schemas.response_errors(CONTRACT_URI, LIST, 401, error) == []
    if status == 400:
        assert error["group"] == "request" and error["validationDetail"]
    if status == 401:
        assert error["group"] == "auth_verify" and response.headers["www-authenticate"].startswith("Bearer")


# ------------------------------------------------------------------------------------------ known bugs

NOT_URIS = [
    "https://static.example.com/icons/{ubuntu}.svg",  # RFC 3986 excludes { }
    "https://static.example.com/icons/ubuntü.svg",  # an IRI, not a URI
    "https://static.example.com/icons/%zz.svg",  # a malformed percent-escape
    "https://[::1/icons/ubuntu.svg",  # an unbalanced IP-literal bracket
]


def test_only_uris_are_served_as_icons(shared_server: LiveServer, contract: dict[str, Any]) -> None:
    validator = Schemas({CONTRACT_URI: contract})
    problems: dict[str, Any] = {}
    org = uuid.uuid4()  # the shared server's other tests never see this org's Customized images
    with httpx.Client(
        base_url=shared_server.url, headers=bearer(shared_server, org, scopes=["images:write"]), timeout=10
    ) as client:
        for icon in NOT_URIS:
            created = client.post(LIST, json=create_body(org, icon=icon))
            if created.status_code == 400:  # refusing it is right too
                continue
            assert created.status_code == 201, created.text
            served = client.get(f"{LIST}/{created.json()['id']}").json()
            errors = validator.errors(CONTRACT_URI, pointer("components", "schemas", "ImageResp"), served)
            if errors:
                problems[icon] = errors
    assert problems == {}


@pytest.mark.parametrize("shift", ["hyphens-moved", "hyphens-trailing"])
def test_ids_not_in_uuid_form_are_400(
    demo_server: LiveServer, schemas: Schemas, demo_org: uuid.UUID, shift: str
) -> None:
    compact = PUBLIC_ID.replace("-", "")
    raw = compact[:7] + "-" + compact[7:12] + "-" + compact[12:16] + "-" + compact[16:20] + "-" + compact[20:]
    raw = raw if shift == "hyphens-moved" else compact + "----"
    assert len(raw) == 36 and not is_uuid(raw)
    response = httpx.get(f"{demo_server.url}{LIST}/{raw}", headers=bearer(demo_server, demo_org), timeout=10)
    assert response.status_code == 400, response.text
    assert schemas.response_errors(SERVED_URI, GET, 400, response.json()) == []
