"""A client from another ecosystem, generated at test time: openapi-typescript + openapi-fetch on Node.

tests/node_client/ pins the packages (package.json exact versions, package-lock.json); the set-up below
installs them with ``npm ci`` into a cache directory outside the repository (once per lock file), then
generates TypeScript types from the contract file as given and from the document the server serves
(fetched by openapi-typescript through ``/api``), type-checks tests/node_client/client.ts against both
with tsc, and runs it with Node against a live server, configured like production (``<base>/api``).
Skipped when Node is missing, except with CI=true, where it fails (as it does whenever npm cannot install).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import platformdirs
import pytest

from cluster_engine.testing import LiveServer

from .toolkit import EXPIRED, INVALID

HERE = Path(__file__).resolve().parent / "node_client"
INSTALL_TIMEOUT = 300  # seconds for npm ci (a cold npm cache downloads about 5 MB)
STEP_TIMEOUT = 120


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node and npm are required with CI=true (Debian: apt-get install nodejs npm)")
        pytest.skip("node/npm not installed")
    return node, npm


def _run(command: list[str], cwd: Path, timeout: float = STEP_TIMEOUT) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _installed(npm: str) -> Path:
    """node_modules for tests/node_client's lock file, installed once into the user's cache directory."""
    lock = (HERE / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (HERE / "package.json").read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("CE_TEST_NODE_CACHE") or platformdirs.user_cache_dir("cluster-engine-tests"))
    target = root / f"node-client-{digest}"
    if not (target / "node_modules" / ".bin" / "tsc").exists():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="node-client-", dir=root))
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, staging / name)
        _run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], staging, INSTALL_TIMEOUT)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target / "node_modules"


@pytest.fixture(scope="module")
def node_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer.start(tmp_path_factory.mktemp("node"), args=["--demo"]) as server:
        yield server


def test_generated_typescript_client_lists_filters_and_gets_the_contracts_errors_through_api(
    node_server: LiveServer, demo_org: uuid.UUID, tmp_path: Path
) -> None:
    node, npm = _tools()
    modules = _installed(npm)
    work = tmp_path / "client"
    work.mkdir()
    for name in ("client.ts", "tsconfig.json", "package.json"):
        shutil.copy(HERE / name, work / name)
    (work / "node_modules").symlink_to(modules, target_is_directory=True)
    bin_dir = modules / ".bin"
    contract = resources.files("cluster_engine") / "contract" / "list-images.openapi.yaml"
    with resources.as_file(contract) as contract_path:
        _run([node, str(bin_dir / "openapi-typescript"), str(contract_path), "-o", "contract.d.ts"], work)
    served = f"{node_server.url}/api/openapi.json"
    _run([node, str(bin_dir / "openapi-typescript"), served, "-o", "served.d.ts"], work)
    _run([node, str(bin_dir / "tsc"), "-p", "tsconfig.json"], work)  # the calls type-check, then compile

    token = node_server.token(demo_org)
    root = node_server.client(demo_org)
    whole = root.get("/v1/images").json()
    sample = next(image for image in whole if image["type"] == "Customized")
    idc, product = sample["idc"], sample["supportedProducts"][0]
    expected = root.get("/v1/images", params={"idc": idc, "product": product}).json()
    expired = node_server.token(demo_org, ttl=-60)
    out: dict[str, Any] = json.loads(
        _run([node, "client.js", node_server.url, token, expired, idc, product, sample["id"]], work)
    )

    assert out["all"] == {"status": 200, "count": len(whole), "url": f"{node_server.url}/api/v1/images"}
    filtered = out["filtered"]
    assert filtered["status"] == 200 and filtered["url"].startswith(f"{node_server.url}/api/v1/images?")
    assert [image["id"] for image in filtered["images"]] == [image["id"] for image in expected]
    assert 0 < len(expected) < len(whole)
    assert all(i["idc"] == idc and product in i["supportedProducts"] for i in filtered["images"])
    assert {"Customized", "Public"} >= {image["type"] for image in filtered["images"]}
    assert out["page"]["status"] == 200 and out["page"]["count"] == 1
    assert out["page"]["link"].startswith("</api/v1/images?limit=1&cursor=")
    assert out["one"] == {"status": 200, "id": sample["id"]}
    invalid = out["invalid"]
    assert invalid["status"] == 400
    assert invalid["error"]["code"] == 0 and invalid["error"]["group"] == "request"
    assert [d["field"] for d in invalid["error"]["validationDetail"]] == ["idc"]
    assert out["missing"]["status"] == 401 and out["missing"]["error"] == INVALID
    assert out["missing"]["wwwAuthenticate"].startswith("Bearer")
    assert out["expired"] == {"status": 401, "error": EXPIRED}
