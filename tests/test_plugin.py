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

import pytest

ROOT = Path(__file__).parent.parent
PLUGIN_USER = Path(__file__).parent / "plugin_user"


def pytest_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pytest -p cluster_engine ARGS`` in ``cwd``. Other installed plugins are not loaded
    (schemathesis alone takes seconds to import); the entry point itself is checked in this session."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "cluster_engine", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_users_test_suite_runs_on_the_plugin_fixtures() -> None:
    result = pytest_run(cwd=PLUGIN_USER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rootdir: {PLUGIN_USER}" in result.stdout
    assert " 7 passed" in result.stdout


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
        "cluster_engine_catalog",
    ):
        assert fixture in listed
