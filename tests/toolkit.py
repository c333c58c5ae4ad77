"""The suite's toolkit: the contract's fixed bodies, the one HTTP helper (``Api``), the assert helpers and
the app in this process (``in_process``).

Sample images come from ``cluster_engine.testing.samples`` (shared with the drills and bench scripts);
servers from ``conftest.py``: ``demo_server`` for reads, ``shared_server`` + ``fresh_catalog`` for writes
(real processes), ``app`` for rules of the application that need no process (``in_process``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from cluster_engine.cli.main import _load_demo
from cluster_engine.pytest_plugin import Catalog
from cluster_engine.server.auth import mint_token
from cluster_engine.server.config import load_settings
from cluster_engine.storage import db
from cluster_engine.testing import LiveServer
from cluster_engine.testing.inprocess import InProcess
from cluster_engine.testing.stores import in_store

# The contract's fixed bodies.
INVALID = {"code": 0, "group": "auth_verify", "message": "Invalid access token."}
EXPIRED = {"code": 1, "group": "auth_verify", "message": "Expired access token."}
NOT_FOUND = {"reason": "image not found"}
ROUTE_NOT_FOUND = {"reason": "not found"}
WRITE, ADMIN = "images:write", "images:admin"

# What a 401 answers (``assert_401``): the challenge says ``error="invalid_token"`` for a token that was
# sent and refused, nothing for none sent; ``REFUSED`` checks the body and the scheme only.
MISSING, INVALID_TOKEN, EXPIRED_TOKEN, OTHER_SCHEME, REFUSED = (
    "missing",
    "invalid",
    "expired",
    "other-scheme",
    "refused",
)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def assert_ok(response: httpx.Response) -> list[Any]:
    """A 200 list answer; its images."""
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert isinstance(body, list)
    return body


def assert_401(response: httpx.Response, kind: str = INVALID_TOKEN) -> None:
    assert response.status_code == 401, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    assert response.json() == (EXPIRED if kind == EXPIRED_TOKEN else INVALID)
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    if kind == MISSING:  # RFC 6750 §3.1: no error code when no credentials were sent
        assert "error=" not in challenge
    elif kind in (INVALID_TOKEN, EXPIRED_TOKEN):
        assert 'error="invalid_token"' in challenge


def assert_reason(response: httpx.Response, status: int, reason: str | None = None) -> None:
    """A 403/404/409/413… answers the contract's ``error`` body: exactly ``{"reason": …}`` (this one)."""
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"reason"} and isinstance(body["reason"], str) and body["reason"], body
    if reason is not None:
        assert body == {"reason": reason}


def details(response: httpx.Response) -> list[tuple[str, str]]:
    """(field, expression) of each validationDetail of a 400, after checking the body's shape."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["group"] == "request" and body["code"] == 0
    for item in body["validationDetail"]:
        assert isinstance(item["originalValue"], str) and item["reason"]
    return [(item["field"], item["expression"]) for item in body["validationDetail"]]


def fresh_catalog(server: LiveServer) -> LiveServer:
    """Empty ``server``'s catalog (every image deleted through the API, so its read model follows) for a
    test that shares a module's server but asserts on the whole catalog (Public images, export); the
    clients earlier tests made are closed, so that their idle connections do not pile up on it."""
    server.close_clients()
    Catalog(server).clear()
    return server


class Api:
    """One server, one connection pool; each call says which org and scopes its token carries.
    ``began`` is the catalog revision when it was made: audit rows after it are this test's."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.http = server.client()
        self.began = self.revision()

    def revision(self) -> int:
        revision = self.http.get("/readyz").json()["revision"]
        assert isinstance(revision, int)
        return revision

    def headers(
        self, org: uuid.UUID | None, scopes: Sequence[str] = (), subject: str | None = None
    ) -> dict[str, str]:
        if org is None:
            return {}
        token = mint_token(self.server.secret, org, scopes=list(scopes), subject=subject)
        return {"Authorization": bearer(token)}

    def request(
        self,
        method: str,
        path: str,
        org: uuid.UUID | None,
        scopes: Sequence[str] = (),
        *,
        subject: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        all_headers = {**self.headers(org, scopes, subject), **(headers or {})}
        return self.http.request(method, path, headers=all_headers, **kwargs)

    def create(
        self, org: uuid.UUID, scopes: Sequence[str], body: Any, *, subject: str | None = None
    ) -> httpx.Response:
        return self.request("POST", "/v1/images", org, scopes, subject=subject, json=body)

    def created(self, org: uuid.UUID, scopes: Sequence[str], body: Any, **kwargs: Any) -> dict[str, Any]:
        response = self.create(org, scopes, body, **kwargs)
        assert response.status_code == 201, response.text
        image: dict[str, Any] = response.json()
        return image

    def patch(
        self,
        org: uuid.UUID,
        scopes: Sequence[str],
        image_id: str,
        patch: Any,
        *,
        content_type: str = "application/merge-patch+json",
        subject: str | None = None,
    ) -> httpx.Response:
        return self.request(
            "PATCH",
            f"/v1/images/{image_id}",
            org,
            scopes,
            subject=subject,
            content=json.dumps(patch).encode(),
            headers={"Content-Type": content_type},
        )

    def delete(
        self, org: uuid.UUID, scopes: Sequence[str], image_id: str, *, subject: str | None = None
    ) -> httpx.Response:
        return self.request("DELETE", f"/v1/images/{image_id}", org, scopes, subject=subject)

    def get(self, org: uuid.UUID, image_id: str) -> httpx.Response:
        return self.request("GET", f"/v1/images/{image_id}", org)

    def list(self, org: uuid.UUID, **params: str) -> list[dict[str, Any]]:
        response = self.request("GET", "/v1/images", org, params=params)
        assert response.status_code == 200, response.text
        images: list[dict[str, Any]] = response.json()
        return images

    def ids(self, org: uuid.UUID, **params: str) -> list[str]:
        return [image["id"] for image in self.list(org, **params)]

    def state(self, orgs: Sequence[uuid.UUID]) -> tuple[Any, ...]:
        """What a rejected write must not change: the catalog revision (every committed write takes a new
        one), and each org's list."""
        return (self.revision(), *(self.list(org) for org in orgs))

    @contextlib.contextmanager
    def unchanged(self, *orgs: uuid.UUID) -> Iterator[None]:
        before = self.state(orgs)
        yield
        assert self.state(orgs) == before

    def audit(self, *args: str) -> list[dict[str, Any]]:
        """``cluster-engine audit -o json ARGS``: the rows this test wrote (revisions after ``began``)."""
        rows: list[dict[str, Any]] = json.loads(self.server.cli("audit", "-o", "json", *args).stdout)
        return [row for row in rows if row["revision"] > self.began]


@contextlib.contextmanager
def in_process(directory: Path, env: Mapping[str, str] | None = None, *, demo: bool = False) -> Iterator[App]:
    """The app in this process on a migrated SQLite database in ``directory`` (``demo``: with the demo
    catalog), with the ``CE_*`` settings of ``env``."""
    url = f"sqlite:///{directory / 'cluster-engine.db'}"
    db.upgrade(url)
    if demo:
        in_store(url, _load_demo)
    secret = secrets.token_urlsafe(32)
    env = {"CE_ACCESS_LOG": "false", **(env or {}), "CE_JWT_SECRET": secret}
    with InProcess.start(load_settings(env, data_dir=directory, database_url=url)) as runner:
        yield App(runner, secret)


class App:
    """The app in this process (``cluster_engine.testing.inprocess``): ``http`` sends to it."""

    def __init__(self, runner: InProcess, secret: str) -> None:
        self.runner = runner
        self.http = runner.http
        self.secret = secret

    def token(self, org: uuid.UUID, *, scopes: Sequence[str] = (), ttl: float = 3600) -> str:
        return mint_token(self.secret, org, scopes=list(scopes), ttl=ttl)

    def headers(self, org: uuid.UUID, scopes: Sequence[str] = ()) -> dict[str, str]:
        return {"Authorization": bearer(self.token(org, scopes=scopes))}
