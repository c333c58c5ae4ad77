"""An unmigrated database: ``serve`` refuses it in one line, ``/readyz`` says what to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cluster_engine.storage import db
from cluster_engine.testing import LiveServer, free_port

from .conftest import Databases


def _serve(url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CE_")}
    env |= {"CE_DATABASE_URL": url, "CE_DATA_DIR": str(data_dir), "CE_JWT_SECRET": "x" * 40}
    port = str(free_port())
    return subprocess.run(
        [sys.executable, "-m", "cluster_engine", "serve", "--port", port, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_refuses_an_empty_postgresql_database_in_one_line(databases: Databases, tmp_path: Path) -> None:
    url = databases.url("postgresql", tmp_path)
    result = _serve(url, tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "the database has no schema" in line
    assert "cluster-engine db upgrade" in line and "serve --migrate" in line
    assert "cluster-engine serving" not in result.stdout  # it never started


def test_serve_refuses_a_postgresql_database_behind_the_head(databases: Databases, tmp_path: Path) -> None:
    url = databases.url("postgresql", tmp_path)
    db.upgrade(url, "0001")
    result = _serve(url, tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"the database schema is at 0001, this release needs {db.head_revision()}" in line


def test_readyz_names_db_upgrade_when_the_schema_goes_missing(databases: Databases, tmp_path: Path) -> None:
    url = databases.url("postgresql", tmp_path)
    with LiveServer.start(tmp_path, database_url=url, args=["--migrate"]) as server:
        db.downgrade(url, "base")  # as if another release's rollback took the schema away
        response = httpx.get(f"{server.url}/readyz", timeout=10)
        assert response.status_code == 503
        reason = response.json()["reason"]
        assert reason.startswith("the database has no schema: run `cluster-engine db upgrade`"), reason
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("store", ["sqlite"])
def test_serve_no_migrate_refuses_an_empty_sqlite_database_too(store: str, tmp_path: Path) -> None:
    result = _serve(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path, "--no-migrate")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "the database has no schema" in line


def test_serve_on_every_interface_with_a_generated_secret_warns_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CE_")}
    env |= {"CE_DATA_DIR": str(tmp_path), "CE_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    env |= {"CE_LOG_FORMAT": "text"}
    command = [sys.executable, "-m", "cluster_engine", "serve", "--no-migrate", "--host", "0.0.0.0"]
    result = subprocess.run(  # refused before it listens (--no-migrate on an empty database): no traffic
        [*command, "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, result.stderr
    assert "every interface with a generated development secret" in warnings[0]
    assert "CE_JWT_SECRET" in warnings[0]
