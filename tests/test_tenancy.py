"""Tenant isolation as a stateful property over HTTP: random writes and reads against a model.

The suite's shared server on each store (``shared_server``: SQLite, PostgreSQL) serves every example. Each
example invents 3 or 4 fresh orgs (uuid4) and two idcs of its own, then runs a random sequence of creates
(both types, by tokens with no scope, ``images:write``, ``images:admin`` or both, for the caller's own org
or another), merge patches, deletes, gets and filtered lists, and predicts every answer from a brute-force
model of the documented rules. Public images left by earlier examples and tests are visible to every org:
each example starts from the list a brand-new org gets (only Public images) and keeps them in its model.

Invariants checked on every step:
- no list and no GET ever returns another org's Customized image;
- a hidden image (another org's Customized one) answers GET, and PATCH/DELETE without ``images:admin``,
  with a 404 byte-identical to the one for a random id that never existed;
- a delete or patch of another org's image never succeeds without ``images:admin``;
- every list equals the model's: visible, filtered by ``idc`` and ``product``, ordered by ``createdAt``
  then ``id``;
- every status code is the one the rules give (403 scope, 404 hidden/missing, 409 duplicate name in the
  same owner namespace and idc, 201/200/204 otherwise), and successful writes answer the model's image.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from cluster_engine.server.auth import mint_token
from cluster_engine.testing import LiveServer
from cluster_engine.testing.samples import image_body, root_only

WRITE = "images:write"
ADMIN = "images:admin"
SCOPE_SETS: list[tuple[str, ...]] = [(), (WRITE,), (ADMIN,), (WRITE, ADMIN)]
NAMES = ["ubuntu", "Rocky 9", "debian-12"]  # few names, so duplicates (409) are common
PRODUCTS = ["gpu.h100.8x", "gpu.b200.8x", "cpu.small"]
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
SETTINGS = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

products = st.lists(st.sampled_from(PRODUCTS), unique=True, max_size=2)
patches = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(NAMES),
        "supportedProducts": products,
        "OSVersion": st.sampled_from(["22.04", "24.04"]),
        "BootMode": st.sampled_from(["UEFI", "Legacy"]),
        "path": st.sampled_from(["images/a.qcow2", "images/b.qcow2"]),
    },
)


@dataclass
class Shared:
    """The server all examples of one store share, with one connection pool and a token cache."""

    server: LiveServer
    http: httpx.Client
    tokens: dict[tuple[uuid.UUID, tuple[str, ...]], str] = field(default_factory=dict)

    def headers(self, org: uuid.UUID, scopes: Sequence[str]) -> dict[str, str]:
        key = (org, tuple(scopes))
        if key not in self.tokens:
            self.tokens[key] = mint_token(self.server.secret, org, scopes=list(scopes))
        return {"Authorization": f"Bearer {self.tokens[key]}"}


@pytest.fixture(scope="module")
def shared(shared_server: LiveServer) -> Shared:
    return Shared(server=shared_server, http=shared_server.client())


def namespace(image: dict[str, Any]) -> str:
    return "public" if image["type"] == "Public" else image["orgId"]


def visible(image: dict[str, Any], org: uuid.UUID) -> bool:
    return image["type"] == "Public" or image["orgId"] == str(org)


def list_order(image: dict[str, Any]) -> tuple[dt.datetime, str]:
    return (dt.datetime.fromisoformat(image["createdAt"]), image["id"])


class Tenancy(RuleBasedStateMachine):
    shared: ClassVar[Shared]

    def __init__(self) -> None:
        super().__init__()
        self.orgs: list[uuid.UUID] = []
        self.idcs: list[str] = []
        self.images: dict[str, dict[str, Any]] = {}  # this example's live images, by id
        self.foreign: list[dict[str, Any]] = []  # Public images earlier examples left behind
        self.gone: list[str] = []  # ids this example deleted

    # --------------------------------------------------------------------------------------- plumbing

    def call(
        self, method: str, path: str, org: uuid.UUID, scopes: Sequence[str] = (), body: Any = None
    ) -> httpx.Response:
        headers = self.shared.headers(org, scopes)
        if body is not None:
            headers.update(MERGE_PATCH if method == "PATCH" else {"Content-Type": "application/json"})
        content = None if body is None else json.dumps(body).encode()
        return self.shared.http.request(method, path, headers=headers, content=content)

    def assert_like_missing(
        self, response: httpx.Response, method: str, org: uuid.UUID, scopes: Sequence[str], body: Any = None
    ) -> None:
        """The answer must be byte-identical to the one for an id that never existed."""
        reference = self.call(method, f"/v1/images/{uuid.uuid4()}", org, scopes, body)
        assert reference.status_code == 404, reference.text
        assert (response.status_code, response.content) == (404, reference.content), response.text
        assert response.headers["content-type"] == reference.headers["content-type"]

    def clash(self, image: dict[str, Any], exclude: str | None = None) -> bool:
        key = (namespace(image), image["idc"], image["name"])
        return any(
            (namespace(other), other["idc"], other["name"]) == key
            for other in self.images.values()
            if other["id"] != exclude
        )

    def target(self, data: st.DataObject) -> str:
        """A live image of this example, a deleted one, or an id that never existed."""
        live = list(self.images)
        choice = data.draw(st.sampled_from([*live, *live, *self.gone, "missing"]), label="target")
        return str(uuid.uuid4()) if choice == "missing" else choice

    def caller(self, data: st.DataObject) -> tuple[uuid.UUID, tuple[str, ...]]:
        org = data.draw(st.sampled_from(self.orgs), label="caller")
        return org, data.draw(st.sampled_from(SCOPE_SETS), label="scopes")

    # ------------------------------------------------------------------------------------------ rules

    @initialize(
        count=st.integers(min_value=3, max_value=4),
        seeds=st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=3),
                st.sampled_from(["Public", "Customized"]),
                st.integers(min_value=0, max_value=1),
                st.sampled_from(NAMES),
                products,
            ),
            max_size=5,
        ),
    )
    def fresh_orgs(self, count: int, seeds: list[tuple[int, str, int, str, list[str]]]) -> None:
        """Fresh orgs and idcs for this example, the Public images already there, and a few seed images."""
        self.orgs = [uuid.uuid4() for _ in range(count)]
        suffix = uuid.uuid4().hex[:10]
        self.idcs = [f"dc-a-{suffix}", f"dc-b-{suffix}"]
        baseline = self.call("GET", "/v1/images", uuid.uuid4())
        assert baseline.status_code == 200
        self.foreign = baseline.json()
        assert all(image["type"] == "Public" for image in self.foreign)
        for index, kind, idc, name, supported in seeds:
            owner = self.orgs[index % count]
            scopes = (ADMIN,) if kind == "Public" else (WRITE,)
            self.check_create(owner, scopes, kind, owner, self.idcs[idc], name, "UEFI", supported)

    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        org = data.draw(st.sampled_from(self.orgs), label="caller")
        scopes = data.draw(st.sampled_from([*SCOPE_SETS, (WRITE,)]), label="scopes")
        self.check_create(
            org,
            scopes,
            data.draw(st.sampled_from([None, "Public", "Customized", None]), label="type"),
            data.draw(st.sampled_from([org, org, *self.orgs]), label="owner"),
            data.draw(st.sampled_from(self.idcs), label="idc"),
            data.draw(st.sampled_from(NAMES), label="name"),
            data.draw(st.sampled_from(["UEFI", "Legacy"]), label="BootMode"),
            data.draw(products, label="supportedProducts"),
        )

    def check_create(
        self,
        org: uuid.UUID,
        scopes: Sequence[str],
        kind: str | None,
        owner: uuid.UUID,
        idc: str,
        name: str,
        boot_mode: str,
        supported: list[str],
    ) -> None:
        body = image_body(
            owner,
            name,
            idc=idc,
            path="images/disk.qcow2",
            BootMode=boot_mode,
            DefaultPartitionTable=root_only(),
            icon="https://static.example.com/os.svg",
            supportedProducts=supported,
        )
        if kind is not None:
            body["type"] = kind
        image_type = kind or "Customized"
        response = self.call("POST", "/v1/images", org, scopes, body)

        if not scopes or (ADMIN not in scopes and (image_type == "Public" or owner != org)):
            assert response.status_code == 403, response.text
        elif self.clash({**body, "type": image_type}):
            assert response.status_code == 409, response.text
        else:
            assert response.status_code == 201, response.text
            image = response.json()
            assert response.headers["location"] == f"/v1/images/{image['id']}"
            assert image == {**body, "type": image_type, "id": image["id"], "createdAt": image["createdAt"]}
            assert image["id"] not in self.images
            self.images[image["id"]] = image
        if response.status_code != 201:
            assert set(response.json()) == {"reason"}

    def on_target(
        self, data: st.DataObject, method: str, body: Any = None
    ) -> tuple[uuid.UUID, Sequence[str], str, dict[str, Any] | None, httpx.Response]:
        """A drawn caller sends ``method`` to a drawn image id: (org, scopes, id, the model's image or
        None, the answer)."""
        org, scopes = self.caller(data)
        image_id = self.target(data)
        response = self.call(method, f"/v1/images/{image_id}", org, scopes, body)
        return org, scopes, image_id, self.images.get(image_id), response

    @rule(data=st.data(), patch=patches)
    def patch(self, data: st.DataObject, patch: dict[str, Any]) -> None:
        org, scopes, image_id, image, response = self.on_target(data, "PATCH", patch)

        if not scopes:
            assert response.status_code == 403, response.text
            return
        if image is None or (ADMIN not in scopes and not visible(image, org)):
            self.assert_like_missing(response, "PATCH", org, scopes, patch)
            return
        if ADMIN not in scopes and image["type"] == "Public":
            assert response.status_code == 403, response.text
            return
        # Only images:admin or the owner org's images:write on a Customized image get this far.
        assert ADMIN in scopes or (image["type"] == "Customized" and image["orgId"] == str(org))
        after = {**image, **patch}
        if self.clash(after, exclude=image_id):
            assert response.status_code == 409, response.text
            return
        assert response.status_code == 200, response.text
        assert response.json() == after
        self.images[image_id] = after

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        org, scopes, image_id, image, response = self.on_target(data, "DELETE")

        if response.status_code == 204:  # whatever the model says: never across orgs without admin
            assert image is not None
            assert ADMIN in scopes or (
                WRITE in scopes and image["type"] == "Customized" and image["orgId"] == str(org)
            )
        if not scopes:
            assert response.status_code == 403, response.text
        elif image is None or (ADMIN not in scopes and not visible(image, org)):
            self.assert_like_missing(response, "DELETE", org, scopes)
        elif ADMIN not in scopes and image["type"] == "Public":
            assert response.status_code == 403, response.text
        else:
            assert response.status_code == 204, response.text
            assert response.content == b""
            del self.images[image_id]
            self.gone.append(image_id)

    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        org, scopes, _image_id, image, response = self.on_target(data, "GET")
        if image is not None and visible(image, org):
            assert response.status_code == 200, response.text
            assert response.json() == image
        else:
            self.assert_like_missing(response, "GET", org, scopes)

    @rule(
        idc=st.sampled_from([None, 0, 1]),
        product=st.sampled_from([None, *PRODUCTS]),
    )
    def list_every_org(self, idc: int | None, product: str | None) -> None:
        params = {}
        if idc is not None:
            params["idc"] = self.idcs[idc]
        if product is not None:
            params["product"] = product
        everything = [*self.foreign, *self.images.values()]
        for org in [*self.orgs, uuid.uuid4()]:  # the last one: an org that owns nothing
            response = self.shared.http.get("/v1/images", params=params, headers=self.shared.headers(org, ()))
            assert response.status_code == 200, response.text
            body = response.json()
            leaked = [i["id"] for i in body if i["type"] != "Public" and i["orgId"] != str(org)]
            assert leaked == [], "another org's Customized image was listed"
            expected = sorted(
                (
                    image
                    for image in everything
                    if visible(image, org)
                    and ("idc" not in params or image["idc"] == params["idc"])
                    and (product is None or product in image["supportedProducts"])
                ),
                key=list_order,
            )
            assert [i["id"] for i in body] == [i["id"] for i in expected], (org, params)
            assert body == expected


def test_tenant_isolation_and_lists_match_the_model(shared: Shared) -> None:
    class Machine(Tenancy):
        pass

    Machine.shared = shared
    run_state_machine_as_test(Machine, settings=SETTINGS)
