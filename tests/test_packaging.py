"""The distribution as users install it: a wheel built from this checkout, in fresh virtual environments.

Without extras it is the SDK and the ``images`` CLI, none of the server stack; the server commands then stop
with one line naming the ``server`` extra; with ``[server]`` the same wheel serves. Building the wheel and
the two environments takes a minute or two (pip resolves the dependencies from the configured index); they
are made once per session. Never skipped: it needs only Python's ``venv`` and pip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cluster_engine.testing import LiveServer

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = ("granian", "sqlalchemy", "psycopg", "alembic", "starlette", "aiosqlite", "jwt")


@dataclass(frozen=True)
class Venv:
    path: Path

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    @property
    def command(self) -> str:
        return str(self.path / "bin" / "cluster-engine")

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("CE_", "PYTHON", "VIRTUAL_ENV"))}
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=600,
            env={**clean, **(env or {})},
            cwd=self.path,  # not the checkout: nothing of it on sys.path
            check=False,
        )


def _pip(venv: Venv, *args: str) -> None:
    result = venv.run(venv.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("cluster_engine-*.whl")
    return built


def _venv(tmp_path_factory: pytest.TempPathFactory, name: str) -> Venv:
    path = tmp_path_factory.mktemp(name) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return Venv(path)


@pytest.fixture(scope="session")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    venv = _venv(tmp_path_factory, "client-venv")
    _pip(venv, str(wheel))
    return venv


@pytest.fixture(scope="session")
def server_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    venv = _venv(tmp_path_factory, "server-venv")
    _pip(venv, f"cluster-engine[server] @ {wheel.as_uri()}")
    return venv


def test_the_wheel_ships_py_typed_the_license_and_no_bytecode(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "cluster_engine/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    assert "cluster_engine/storage/migrations/env.py" in names
    assert not [name for name in names if name.endswith(".pyc") or "__pycache__" in name]


def test_the_wheel_declares_the_server_and_test_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(meta).decode()
    requires = [
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")
    ]
    default = sorted(r.split(">=")[0].split("[")[0].lower() for r in requires if "extra ==" not in r)
    assert default == ["click", "httpx", "msgspec", "platformdirs", "pyyaml"]
    assert "Provides-Extra: server" in text
    assert "Classifier: Typing :: Typed" in text


def test_without_extras_the_sdk_and_the_images_cli_work(client_venv: Venv) -> None:
    result = client_venv.run(
        client_venv.python, "-c", "from cluster_engine.client import AsyncClient, Client; print('ok')"
    )
    assert result.stdout == "ok\n", result.stderr
    result = client_venv.run(client_venv.command, "images", "list", "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    result = client_venv.run(client_venv.command, "--version")
    assert result.returncode == 0 and "cluster-engine" in result.stdout, result.stderr


def test_without_extras_no_server_package_is_installed(client_venv: Venv) -> None:
    probe = (
        "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    )
    result = client_venv.run(client_venv.python, "-c", probe, *SERVER_ONLY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["serve", "--demo"],
        ["db", "upgrade"],
        ["token", "--org", "0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01"],
        ["audit"],
    ],
)
def test_without_extras_server_commands_name_the_extra_in_one_line(
    client_venv: Venv, command: list[str]
) -> None:
    result = client_venv.run(client_venv.command, *command)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'cluster-engine[server]'" in lines[0]
    assert result.stdout == ""


def test_without_extras_the_plugin_fixtures_name_the_extra(client_venv: Venv, tmp_path: Path) -> None:
    _pip(client_venv, "pytest>=8.3")
    test = tmp_path / "test_uses_server.py"
    test.write_text("def test_it(cluster_engine_client):\n    pass\n")
    result = client_venv.run(client_venv.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test))
    assert result.returncode != 0
    assert "pip install 'cluster-engine[server]'" in result.stdout
    assert "Traceback" not in result.stdout


def test_with_the_server_extra_serve_demo_answers_401_without_a_token(
    server_venv: Venv, tmp_path: Path
) -> None:
    with LiveServer.start(tmp_path / "data", args=["--demo"], python=server_venv.python) as server:
        response = httpx.get(f"{server.url}/v1/images", timeout=10)
    assert response.status_code == 401
