"""`cluster-engine token` for failure paths and without a secret; `serve` on a port that is already in use."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from cluster_engine.testing import LiveServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer.start(tmp_path_factory.mktemp("cli-dx"), env={"CE_JWT_LEEWAY": "30"}) as server:
        yield server


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster_engine", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def clean_env(data_dir: Path) -> dict[str, str]:
    """The caller's environment without any CE_* setting, and a data directory of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CE_")}
    return {**env, "CE_DATA_DIR": str(data_dir)}


def answer(server: LiveServer, token: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/images", headers={"Authorization": f"Bearer {token}"}, timeout=10)


@pytest.mark.parametrize("args", [["--expired"], ["--ttl=-5m"], ["--ttl", "-1h"]])
def test_expired_tokens_are_signed_and_refused_as_expired(server: LiveServer, args: list[str]) -> None:
    token = server.cli("token", "--org", str(uuid.uuid4()), *args).stdout.strip()
    claims = jwt.decode(token, server.secret, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["exp"] < claims["iat"] - 30  # past the server's 30 s leeway
    response = answer(server, token)
    assert response.status_code == 401
    assert response.json()["message"] == "Expired access token."


def test_zero_ttl_is_refused(server: LiveServer) -> None:
    result = server.cli("token", "--org", str(uuid.uuid4()), "--ttl", "0", check=False)
    assert result.returncode == 2 and "non-zero duration" in result.stderr


def test_token_without_a_secret_refuses_with_a_hint(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data")
    result = cli("token", "--org", str(uuid.uuid4()), env=env)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "no signing secret" in line and "--create-secret" in line
    assert not (tmp_path / "data" / "jwt-secret").exists()


def test_token_create_secret_makes_one_that_serve_then_uses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(data)
    token = cli("token", "--org", str(uuid.uuid4()), "--create-secret", env=env).stdout.strip()
    secret = (data / "jwt-secret").read_text().strip()
    assert jwt.decode(token, secret, algorithms=["HS256"])
    again = cli("token", "--org", str(uuid.uuid4()), env=env)  # now there is one: no flag needed
    assert again.returncode == 0 and jwt.decode(again.stdout.strip(), secret, algorithms=["HS256"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_busy_port_exits_naming_the_port(server: LiveServer, tmp_path: Path, workers: str) -> None:
    port = server.url.rsplit(":", 1)[1]
    env = clean_env(tmp_path)  # another database: it must not end up sharing the port
    result = cli("serve", "--port", port, "--workers", workers, env=env, timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line == f"Error: port {port} on 127.0.0.1 is already in use; choose another with --port"
    assert answer(server, server.token(uuid.uuid4())).status_code == 200  # the first server is unaffected
