"""The pytest plugin (``cluster_engine.pytest_plugin``, entry point ``pytest11``), used as users use it.

``tests/plugin_user`` is a small project of its own (its own ``pytest.ini`` and ``conftest.py``, nothing
imported from ``tests/``) whose tests use the plugin's fixtures. It runs here in a separate pytest
process started in that directory, so that directory is its rootdir and the main ``tests/conftest.py`` is
never loaded. The main run does not collect it a second time: its conftest's ``pytest_ignore_collect``
skips its files whenever it is not the rootdir.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from cluster_engine.testing import LiveServer

ROOT = Path(__file__).parent.parent
PLUGIN_USER = Path(__file__).parent / "plugin_user"


# A developer's shell with settings of its own: none of them may reach the plugin's server or its fixtures.
HOSTILE_SHELL = {
    "CE_JWT_JWKS": "https://idp.invalid/.well-known/jwks.json",
    "CE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/production",
    "CE_JWT_SECRET": "not-the-servers-secret",
    "CE_URL": "http://127.0.0.1:9",
    "CE_TOKEN": "not-a-token",
}


def pytest_run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pytest -p cluster_engine ARGS`` in ``cwd`` (in PLUGIN_USER, whose pytest.ini configures
    them, with pytest-asyncio and anyio too). Other installed plugins are not loaded (schemathesis alone
    takes seconds to import); the entry point itself is checked in this session."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    base["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    plugins = ["-p", "cluster_engine", "-p", "no:cacheprovider"]
    if cwd in (PLUGIN_USER, ROOT):  # their configuration sets pytest-asyncio options
        plugins += ["-p", "asyncio", "-p", "anyio"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *plugins, *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_users_test_suite_runs_on_the_plugin_fixtures() -> None:
    # sync tests, pytest-asyncio (auto mode) and anyio tests, in a shell that exports CE_* of its own
    result = pytest_run("-v", cwd=PLUGIN_USER, env=HOSTILE_SHELL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rootdir: {PLUGIN_USER}" in result.stdout
    assert "asyncio: mode=Mode.AUTO" in result.stdout
    assert "test_async_code_lists_a_loaded_catalog PASSED" in result.stdout
    assert "test_under_anyio PASSED" in result.stdout
    assert " 12 passed" in result.stdout


def test_the_same_suite_runs_against_an_existing_server(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path / "existing") as server:
        options = [
            f"--cluster-engine-url={server.url}",
            f"--cluster-engine-secret={server.secret}",
            f"--cluster-engine-database-url={server.database_url}",
        ]
        result = pytest_run(*options, cwd=PLUGIN_USER, env=HOSTILE_SHELL)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " 12 passed" in result.stdout
        assert httpx.get(f"{server.url}/readyz", timeout=10).json()["revision"] > 0  # it ran here


def test_an_existing_server_needs_a_way_to_make_tokens() -> None:
    result = pytest_run("--cluster-engine-url=http://127.0.0.1:9", cwd=PLUGIN_USER)
    assert result.returncode == 4  # a usage error, before any test
    assert "--cluster-engine-url needs --cluster-engine-secret or --cluster-engine-token" in result.stderr


RESET_PROJECT = """
import pytest

ENTRY = {
    "type": "Public", "orgId": "a1d2c3b4-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "idc": "us-west-1", "name": "x",
    "path": "x.qcow2", "OSSeries": "Ubuntu", "OSVersion": "24.04", "OSArchitecture": "x86_64",
    "BootMode": "UEFI", "SystemDiskSize": "200G",
    "DefaultPartitionTable": [{"name": "root", "mountPoint": "/", "size": "200G", "fileSystem": "ext4"}],
    "icon": "https://static.example.com/x.svg", "supportedProducts": [],
}


def test_1_loads(cluster_engine_catalog):
    cluster_engine_catalog.load([ENTRY])


def test_2_starts_empty(cluster_engine_client):
    assert cluster_engine_client.list_images() == []
"""


def test_the_reset_ini_option_empties_the_catalog_before_each_test(tmp_path: Path) -> None:
    (tmp_path / "test_reset.py").write_text(RESET_PROJECT, encoding="utf-8")
    reset = pytest_run("-q", "-o", "cluster_engine_reset=true", cwd=tmp_path)
    assert reset.returncode == 0 and "2 passed" in reset.stdout, reset.stdout + reset.stderr
    shared = pytest_run("-q", cwd=tmp_path)  # without it, the first test's image is still there
    assert shared.returncode == 1 and "1 failed, 1 passed" in shared.stdout, shared.stdout + shared.stderr


def test_the_main_run_does_not_collect_the_plugin_user_project() -> None:
    # the main configuration (pyproject.toml: rootdir is the repository), as `pytest` with testpaths runs it
    args = ("--co", "-q", "-c", "pyproject.toml", "tests/plugin_user", "tests/test_plugin.py")
    result = pytest_run(*args, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("tests/test_plugin.py::") for line in collected)


def test_the_plugin_is_registered_and_cheap_to_import(request: pytest.FixtureRequest) -> None:
    (entry,) = [ep for ep in metadata.entry_points(group="pytest11") if ep.name == "cluster_engine"]
    assert entry.value == "cluster_engine.pytest_plugin"
    assert request.config.pluginmanager.has_plugin("cluster_engine")
    heavy = ["httpx", "yaml", "sqlalchemy", "jwt", "cluster_engine.testing", "cluster_engine.client"]
    probe = f"import sys, cluster_engine.pytest_plugin; print([m for m in {heavy!r} if m in sys.modules])"
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert imported.stdout.strip() == "[]"


def test_a_session_that_does_not_ask_for_the_fixtures_starts_no_server(tmp_path: Path) -> None:
    (tmp_path / "test_plain.py").write_text(
        "import sys\n\n"
        "def test_plain(request):\n"
        "    assert request.config.pluginmanager.has_plugin('cluster_engine')\n"
        "    assert 'cluster_engine.testing' not in sys.modules\n"
        "    assert not any(f.startswith('cluster_engine_') for f in request.fixturenames)\n",
        encoding="utf-8",
    )
    result = pytest_run("-q", "-W", "error", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = pytest_run("--fixtures", cwd=tmp_path).stdout
    for fixture in (
        "cluster_engine_server",
        "cluster_engine_token",
        "cluster_engine_client",
        "cluster_engine_env",
        "cluster_engine_catalog",
    ):
        assert fixture in listed
    helped = pytest_run("--help", cwd=tmp_path).stdout
    for option in ("--cluster-engine-url", "--cluster-engine-secret", "--cluster-engine-token"):
        assert option in helped
    assert "cluster_engine_reset" in helped
