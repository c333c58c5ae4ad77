"""One log format (CE_LOG_FORMAT) for the app, Granian and the access log; a quiet start-up."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from cluster_engine.server import logformat
from cluster_engine.storage import db
from cluster_engine.testing import LiveServer

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def _record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("cluster_engine.app", logging.ERROR, __file__, 1, message, (), exc_info)


@pytest.mark.parametrize("json_lines", [True, False])
def test_an_exception_stays_on_its_line(json_lines: bool) -> None:
    line = logformat.LineFormatter(json_lines=json_lines).format(_record("unhandled\nerror", exc=True))
    assert "\n" not in line
    if json_lines:
        parsed = json.loads(line)
        assert parsed["level"] == "ERROR" and parsed["logger"] == "cluster_engine.app"
        assert parsed["message"] == "unhandled\nerror"
        assert "Traceback" in parsed["exc"] and "ValueError: boom" in parsed["exc"]
    else:
        assert TEXT_LINE.match(line), line
        assert "unhandled | error | Traceback" in line and "ValueError: boom | second line" in line


def test_granian_loggers_are_shown_as_granian() -> None:
    for name in ("_granian", "_granian.serve"):
        record = logging.LogRecord(name, logging.INFO, __file__, 1, "Started worker-1", (), None)
        assert json.loads(logformat.LineFormatter(json_lines=True).format(record))["logger"].startswith(
            "granian"
        )


def test_the_format_follows_the_setting_else_the_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logformat.resolve(None, Tty()) == "text"
    assert logformat.resolve(None, io.StringIO()) == "json"
    assert logformat.resolve("json", Tty()) == "json"
    assert logformat.resolve("text", io.StringIO()) == "text"


def test_migrations_log_one_line_when_they_run_and_nothing_otherwise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'ce.db'}"
    caplog.set_level(logging.INFO)
    steps = db.upgrade(url)
    assert steps and steps[0].startswith("empty -> ")
    ours = [r for r in caplog.records if r.name.startswith("alembic")]
    assert ours == []
    (line,) = [r for r in caplog.records if r.name == "cluster_engine.storage.db"]
    assert line.levelno == logging.INFO and "database migrated" in line.getMessage()
    caplog.clear()
    assert db.upgrade(url) == []
    assert [r for r in caplog.records if r.name.startswith(("alembic", "cluster_engine"))] == []


def test_serve_demo_starts_in_a_dozen_json_lines_without_probes_or_alembic(tmp_path: Path) -> None:
    with LiveServer.start(tmp_path, args=["--demo"]) as server:  # waits on /readyz: probe requests
        before = server.log().splitlines()
        assert httpx.get(f"{server.url}/v1/images", timeout=10).status_code == 401
        server.stop()
        after = server.log().splitlines()
    assert len(before) <= 12, "\n".join(before)
    assert not [line for line in after if "alembic" in line]
    records = [json.loads(line) for line in after]  # every line is JSON (not a terminal)
    assert all({"time", "level", "logger"} <= record.keys() for record in records)
    assert {r["logger"] for r in records} >= {"cluster_engine", "granian", "access"}
    access = [r for r in records if r["logger"] == "access"]
    assert [r["path"] for r in access] == ["/v1/images"]  # not the /readyz polls


def test_text_format_and_probes_on_request(tmp_path: Path) -> None:
    env = {"CE_LOG_FORMAT": "text", "CE_ACCESS_LOG_PROBES": "true"}
    with LiveServer.start(tmp_path, env=env) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        server.stop()
        lines = server.log().splitlines()
    banner = [line for line in lines if not TEXT_LINE.match(line)]
    assert banner and banner[0].startswith("cluster-engine serving ")
    logged = [line for line in lines if TEXT_LINE.match(line)]
    assert any(" granian: " in line for line in logged)
    assert any(" INFO access: 200 GET /healthz " in line for line in logged)
    assert len(banner) + len(logged) == len(lines)
    assert all(line.startswith(("cluster-engine serving", "  ")) for line in banner), banner
