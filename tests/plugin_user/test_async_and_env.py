"""Async code under test (pytest-asyncio in auto mode; anyio where marked), and code that finds the server
through ``CE_URL`` / ``CE_TOKEN``. The shell that runs this project may export other CE_* values."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from test_uses_plugin import CATALOG, newest_image

from cluster_engine.client import AsyncClient, Client
from cluster_engine.pytest_plugin import DEFAULT_ORG, Catalog, Environment, TokenFactory
from cluster_engine.testing import LiveServer


async def newest_image_async(client: AsyncClient, idc: str, product: str) -> str | None:
    """Async code under test: the newest image bootable on a product, by name."""
    images = await client.list_images(idc=idc, product=product)
    return max(images, key=lambda image: image.createdAt).name if images else None


async def test_async_code_lists_a_loaded_catalog(
    cluster_engine_catalog: Catalog, cluster_engine_server: LiveServer, cluster_engine_token: TokenFactory
) -> None:
    asyncio.get_running_loop()  # inside pytest-asyncio's event loop
    loaded = cluster_engine_catalog.load(CATALOG, replace=True)  # the plain call works in a running loop
    async with AsyncClient(cluster_engine_server.url, cluster_engine_token(uuid.uuid4())) as client:
        assert await client.list_images() == loaded
        assert await newest_image_async(client, "us-west-1", "gpu.h100.8x") == "Ubuntu-24.04"
    assert await cluster_engine_catalog.aload(CATALOG) == loaded  # and the awaitable one


@pytest.mark.anyio
async def test_under_anyio(cluster_engine_catalog: Catalog, cluster_engine_env: Environment) -> None:
    await cluster_engine_catalog.aclear()
    async with AsyncClient() as client:  # CE_URL and CE_TOKEN, from cluster_engine_env
        assert await client.list_images() == []
        loaded = await cluster_engine_catalog.aload(CATALOG[:1])
        assert await client.list_images() == loaded


def test_code_that_reads_ce_url_and_ce_token(
    cluster_engine_env: Environment, cluster_engine_catalog: Catalog
) -> None:
    assert os.environ["CE_URL"] == cluster_engine_env.url
    assert os.environ["CE_TOKEN"] == cluster_engine_env.token
    loaded = cluster_engine_catalog.load(CATALOG, replace=True)
    with Client() as client:  # what the code under test would do
        assert client.list_images() == loaded
        assert newest_image(client, "us-west-1", "gpu.b200.8x") == loaded[1]
        created = client.create_image({**_spec("env-image"), "orgId": str(DEFAULT_ORG)})
        assert created.orgId == DEFAULT_ORG  # CE_TOKEN writes in DEFAULT_ORG
        client.delete_image(created.id)


def test_images_left_by_an_earlier_test(cluster_engine_client: Client) -> None:
    assert cluster_engine_client.list_images() != []  # the test above loaded the catalog


@pytest.mark.cluster_engine_reset
def test_a_marked_test_starts_from_an_empty_catalog(cluster_engine_client: Client) -> None:
    assert cluster_engine_client.list_images() == []


def _spec(name: str) -> dict[str, object]:
    entry = {k: v for k, v in CATALOG[0].items() if k not in ("type", "createdAt")}
    return {**entry, "name": name}
