"""Schemathesis stateful runs against the served document: create → get/patch/list → delete sequences.

The served document links POST /v1/images to getImage, patchImage and deleteImage through the new image's
id, so schemathesis chains real calls on real images instead of guessing ids. Every response of every
step goes through all of schemathesis's checks.
"""

from __future__ import annotations

import collections
from typing import Any

import httpx
import hypothesis
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from cluster_engine.cli.main import DEMO_ORG
from cluster_engine.server import openapi
from cluster_engine.testing import LiveServer

from .test_schemathesis import forged_cursor_rejected

SCHEMA = schemathesis.openapi.from_dict(
    openapi.document(),
    config=schemathesis.Config.from_dict(
        {
            "generation": {"allow-extra-parameters": False, "mode": "positive"},
            # Our links are explicit. Inferred dependencies would read the body's orgId as a reference to an
            # "org" resource nothing produces, and then never start a scenario with POST /v1/images.
            "phases": {"stateful": {"inference": {"algorithms": []}}},
        }
    ),
)
TOKEN: dict[str, str] = {}  # the running test's bearer token, for the auth provider below


@SCHEMA.auth(refresh_interval=None)  # each test has its own server and secret
class BearerToken:
    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return TOKEN["value"]

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


SETTINGS = hypothesis.settings(
    max_examples=40,
    stateful_step_count=8,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def test_stateful_sequences_pass_every_check(server: LiveServer) -> None:
    TOKEN["value"] = server.token(DEMO_ORG, scopes=["images:write", "images:admin"])
    seen: collections.Counter[tuple[str, int]] = collections.Counter()

    created: list[str] = []
    admin = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN['value']}"}, timeout=10
    )

    class Machine(SCHEMA.as_state_machine()):  # type: ignore[misc]
        def teardown(self) -> None:
            # Each scenario starts from the same catalog, so that hypothesis sees the same answers for
            # the same choices (a leftover image would turn a later identical create into a 409).
            for image_id in created:
                assert admin.delete(f"/v1/images/{image_id}").status_code in (204, 404)
            created.clear()

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": server.url}

        def validate_response(
            self, response: Any, case: schemathesis.Case, *args: Any, **kwargs: Any
        ) -> None:
            seen[(f"{case.method} {case.operation.path}", response.status_code)] += 1
            if case.method == "POST" and response.status_code == 201:
                created.append(response.json()["id"])
            excluded = [positive_data_acceptance] if forged_cursor_rejected(case, response) else []
            case.validate_response(
                response, excluded_checks=excluded, transport_kwargs={"base_url": server.url}
            )

    with admin:
        Machine.run(settings=SETTINGS)
    # the links were followed: images were created and then read, changed and deleted by their real ids
    assert seen[("POST /v1/images", 201)] > 0, seen
    # (a GET of an image created for another org is a 404 by design: the token's org can't see it)
    followed = {op for (op, _status) in seen if "{id}" in op}
    assert followed == {"GET /v1/images/{id}", "PATCH /v1/images/{id}", "DELETE /v1/images/{id}"}, seen
    assert seen[("DELETE /v1/images/{id}", 204)] > 0 and seen[("PATCH /v1/images/{id}", 200)] > 0, seen
