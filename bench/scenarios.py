"""What ``bench run`` asks the servers (``Scenario``), the service's real answers captured and checked
once, and the check that the baseline and nginx answer the same bytes."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx

from .catalog import CatalogInfo
from .common import BenchError

SCENARIOS = {
    "filtered": "filtered list ?idc&product",
    "unfiltered": "unfiltered list (org)",
    "not_modified": "filtered + If-None-Match (304)",
    "item": "GET /v1/images/{id} (Public)",
}
HOP_HEADERS = {"date", "server", "connection", "keep-alive", "transfer-encoding"}


@dataclasses.dataclass
class Scenario:
    key: str
    path: str
    query: str
    headers: dict[str, str]  # request headers besides Authorization
    status: int = 0
    response_headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    etag: str = ""
    headers_304: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")

    @property
    def file_name(self) -> str:
        return f"{self.key}.body"

    def header(self, name: str) -> str | None:
        """The service's response header ``name`` (lower case), if any."""
        return dict((k.lower(), v) for k, v in self.response_headers).get(name)

    def request_headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", **self.headers}


def scenarios_for(info: CatalogInfo) -> list[Scenario]:
    query = f"idc={info.idc}&product={info.product}"
    found = [Scenario("filtered", "/v1/images", query, {})]
    if info.n == 1000:
        found.append(Scenario("unfiltered", "/v1/images", "", {}))
    found.append(Scenario("not_modified", "/v1/images", query, {}))
    found.append(Scenario("item", f"/v1/images/{info.public_id}", "", {}))
    return found


def _kept_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(name, value) for name, value in response.headers.items() if name.lower() not in HOP_HEADERS]


def _check_answer(scenario: Scenario, data: Any, info: CatalogInfo) -> list[str]:
    """Notes on what ``scenario``'s 200 answer holds; a BenchError when it is not what the catalog says."""
    if scenario.key == "filtered":
        if len(data) != info.expected_filtered:
            raise BenchError(f"filtered list has {len(data)} images, expected {info.expected_filtered}")
        bad = [i for i in data if i["idc"] != info.idc or info.product not in i["supportedProducts"]]
        if bad:
            raise BenchError(f"filtered list holds {len(bad)} images outside the filter")
        own = sum(1 for i in data if i["type"] == "Customized")
        return [f"filtered `{scenario.target}`: {len(data)} images ({own} of the caller's own)"]
    if scenario.key == "unfiltered":
        if len(data) != info.expected_unfiltered:
            raise BenchError(f"unfiltered list has {len(data)} images, expected {info.expected_unfiltered}")
        return [f"unfiltered `{scenario.target}`: {len(data)} images"]
    if data.get("id") != info.public_id:
        raise BenchError(f"item answered id {data.get('id')!r}, expected {info.public_id}")
    return []


def capture(base: str, token: str, info: CatalogInfo, scenarios: list[Scenario]) -> list[str]:
    """Fetch each scenario's real answer from the service, check it, keep its bytes; return check notes."""
    notes: list[str] = []
    with httpx.Client(base_url=base, timeout=30.0) as client:
        for scenario in scenarios:
            if scenario.key == "not_modified":
                continue
            response = client.get(scenario.target, headers=scenario.request_headers(token))
            if response.status_code != 200:
                raise BenchError(
                    f"{scenario.key}: {scenario.target} → {response.status_code} {response.text[:300]}"
                )
            scenario.status, scenario.body = 200, response.content
            scenario.response_headers = _kept_headers(response)
            scenario.etag = response.headers.get("etag", "")
            notes += _check_answer(scenario, response.json(), info)
        filtered = next(s for s in scenarios if s.key == "filtered")
        if not filtered.etag:
            raise BenchError("the filtered list has no ETag")
        for scenario in scenarios:
            if scenario.key != "not_modified":
                continue
            scenario.headers = {"If-None-Match": filtered.etag}
            scenario.etag = filtered.etag
            response = client.get(scenario.target, headers=scenario.request_headers(token))
            if response.status_code != 304 or response.content:
                raise BenchError(f"If-None-Match answered {response.status_code}, expected an empty 304")
            scenario.status, scenario.body = 304, b""
            scenario.response_headers = scenario.headers_304 = _kept_headers(response)
            filtered.headers_304 = scenario.headers_304
            notes.append(f"If-None-Match {filtered.etag} → 304 (verified)")
    return notes


def check_replica(name: str, base: str, token: str, scenarios: list[Scenario]) -> None:
    """The baseline and nginx must answer each scenario with the service's status and body."""
    with httpx.Client(base_url=base, timeout=30.0) as client:
        for scenario in scenarios:
            response = client.get(scenario.target, headers=scenario.request_headers(token))
            if response.status_code != scenario.status or response.content != scenario.body:
                raise BenchError(
                    f"{name} answers {scenario.key} with {response.status_code},"
                    f" {len(response.content)} bytes; the service with {scenario.status},"
                    f" {len(scenario.body)} bytes"
                )
            if scenario.status == 200 and response.headers.get("content-type") != scenario.header(
                "content-type"
            ):
                raise BenchError(
                    f"{name}: {scenario.key} content-type {response.headers.get('content-type')!r}"
                )
            if response.headers.get("etag") != (scenario.etag or None):
                raise BenchError(
                    f"{name}: {scenario.key} ETag {response.headers.get('etag')!r} ≠ {scenario.etag!r}"
                )
