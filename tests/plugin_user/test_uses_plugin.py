"""Code under test meets a real Images API server through the plugin's fixtures."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster_engine.client import Client, Forbidden, ImageResp, NotFound
from cluster_engine.pytest_plugin import DEFAULT_ORG, Catalog, TokenFactory
from cluster_engine.testing import LiveServer, image_body

PUBLISHER = "a1d2c3b4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"


def catalog_entry(name: str, idc: str, products: list[str], **extra: Any) -> dict[str, Any]:
    """A catalog file entry (an ImageCreateReq, plus ``type`` and optionally ``id`` / ``createdAt``)."""
    return image_body(
        PUBLISHER,
        name,
        idc=idc,
        path=f"images/{idc}/{name}.qcow2",
        OSVersion=name.split("-")[-1],
        supportedProducts=products,
        **{"type": "Public", **extra},
    )


CATALOG = [
    catalog_entry("Ubuntu-22.04", "us-west-1", ["gpu.h100.8x"], createdAt="2026-01-01T00:00:00Z"),
    catalog_entry(
        "Ubuntu-24.04", "us-west-1", ["gpu.h100.8x", "gpu.b200.8x"], createdAt="2026-01-02T00:00:00Z"
    ),
    catalog_entry(
        "Ubuntu-24.04",
        "eu-central-1",
        ["gpu.b200.8x"],
        id="0c5b5a52-9d3b-4f6e-8a1e-2b3c4d5e6f70",
        createdAt="2026-01-03T00:00:00Z",
    ),
]


def newest_image(client: Client, idc: str, product: str) -> ImageResp | None:
    """The kind of code a user would test: pick the newest image bootable on a product."""
    images = client.list_images(idc=idc, product=product)
    return max(images, key=lambda image: image.createdAt, default=None)


def test_code_under_test_against_a_loaded_catalog(cluster_engine_catalog: Catalog, reader: Client) -> None:
    loaded = cluster_engine_catalog.load(CATALOG, replace=True)
    assert [(image.name, image.idc) for image in loaded] == [(e["name"], e["idc"]) for e in CATALOG]
    assert str(loaded[2].id) == CATALOG[2]["id"]  # ids given in a catalog are kept
    assert reader.list_images() == loaded
    assert newest_image(reader, "us-west-1", "gpu.h100.8x") == loaded[1]
    assert newest_image(reader, "us-west-1", "gpu.l40s.4x") is None


def test_catalog_from_a_file_and_replace(
    cluster_engine_catalog: Catalog, reader: Client, tmp_path: Path
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        yaml.safe_dump([catalog_entry("Debian-12", "us-east-2", ["gpu.l40s.4x"])]), encoding="utf-8"
    )
    cluster_engine_catalog.load(CATALOG)
    (debian,) = cluster_engine_catalog.load(path)
    assert {(i.name, i.idc) for i in reader.list_images()} == {(e["name"], e["idc"]) for e in CATALOG} | {
        ("Debian-12", "us-east-2")
    }
    assert cluster_engine_catalog.load(path, replace=True) == [debian]  # unchanged, the others pruned
    assert reader.list_images() == [debian]


def test_invalid_catalog_is_reported(cluster_engine_catalog: Catalog) -> None:
    with pytest.raises(ValueError, match="idc"):
        cluster_engine_catalog.load([catalog_entry("Bad", "us west", ["x"])])


def test_client_writes_in_the_default_org(cluster_engine_client: Client, reader: Client) -> None:
    spec = {
        k: v for k, v in catalog_entry("my-image-24.04", "us-west-1", ["gpu.h100.8x"]).items() if k != "type"
    }
    image = cluster_engine_client.create_image({**spec, "orgId": str(DEFAULT_ORG)})
    assert image.type.value == "Customized" and image.orgId == DEFAULT_ORG
    assert image in cluster_engine_client.list_images()
    with pytest.raises(NotFound):  # another org never sees it
        reader.get_image(image.id)
    cluster_engine_client.delete_image(image.id)


def test_token_factory(cluster_engine_server: LiveServer, cluster_engine_token: TokenFactory) -> None:
    org = uuid.uuid4()
    plain = cluster_engine_token()
    scoped = cluster_engine_token(org, scopes=["images:write"])
    response = httpx.get(
        f"{cluster_engine_server.url}/v1/images", headers={"Authorization": f"Bearer {plain}"}
    )
    assert response.status_code == 200
    spec = {k: v for k, v in catalog_entry("x-1", "us-west-1", []).items() if k != "type"}
    with Client(cluster_engine_server.url, plain) as client, pytest.raises(Forbidden):
        client.create_image({**spec, "orgId": str(DEFAULT_ORG)})  # no scope: read only
    with Client(cluster_engine_server.url, scoped) as client:
        assert client.create_image({**spec, "orgId": str(org)}).orgId == org


def test_clear_removes_every_image(
    cluster_engine_catalog: Catalog, cluster_engine_client: Client, reader: Client
) -> None:
    cluster_engine_catalog.load(CATALOG)
    cluster_engine_catalog.clear()
    assert reader.list_images() == [] and cluster_engine_client.list_images() == []


def test_the_main_suites_conftest_is_not_loaded(request: pytest.FixtureRequest) -> None:
    with pytest.raises(pytest.FixtureLookupError):
        request.getfixturevalue("demo_entries")
