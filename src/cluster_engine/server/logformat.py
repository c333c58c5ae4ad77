"""One log format for every line the server writes: the app's logging, Granian's, and the access log.

``CE_LOG_FORMAT``: ``json`` (one JSON object a line: ``time``, ``level``, ``logger``, ``message``, and
``exc`` with the traceback) or ``text`` (``TIME LEVEL LOGGER: MESSAGE``, a traceback folded onto the same
line); unset, text when stderr is a terminal and JSON otherwise (a container, a log collector). Times are
UTC with milliseconds in both. ``logging_config()`` is a ``logging.config.dictConfig`` dictionary, given
to Granian too (``log_dictconfig``), so that its main process and every worker format the same way.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal, TextIO

Format = Literal["json", "text"]

# Granian's own logger (its Rust side logs through it and its children too); shown as "granian".
GRANIAN_LOGGER = "_granian"


def resolve(setting: str | None, stream: TextIO | None = None) -> Format:
    """The format CE_LOG_FORMAT asks for; unset: text on a terminal, JSON otherwise."""
    if setting in ("json", "text"):
        return setting  # type: ignore[return-value]
    stream = stream or sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def utc_stamp(at: float) -> str:
    """``2026-12-01T19:30:00.123Z``: the time of every line, the access log's included."""
    second = int(at)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{int((at - second) * 1000):03d}Z"


class LineFormatter(logging.Formatter):
    """A record as one line, JSON or text; its exception (if any) on the same line."""

    def __init__(self, json_lines: bool = False) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        name = record.name
        if name.startswith(GRANIAN_LOGGER):  # "_granian", "_granian.serve"
            name = name[1:]
        exc = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        if record.stack_info:
            exc = f"{exc}\n{record.stack_info}" if exc else record.stack_info
        if self.json_lines:
            line: dict[str, Any] = {
                "time": utc_stamp(record.created),
                "level": record.levelname,
                "logger": name,
                "message": message,
            }
            if exc:
                line["exc"] = exc
            return json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str)
        text = f"{utc_stamp(record.created)} {record.levelname} {name}: {_one_line(message)}"
        return f"{text} | {_one_line(exc)}" if exc else text


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


_CHATTER = re.compile(r"Spawning worker-\d+ with PID")


class QuietGranian(logging.Filter):
    """Granian's start-up lines that say nothing an operator acts on ("Spawning worker-N with PID …",
    followed by "Started worker-N" anyway) are shown at debug level only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and _CHATTER.match(record.getMessage()):
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def logging_config(level: str, fmt: Format) -> dict[str, Any]:
    """The dictConfig for the app's loggers (the root logger) and Granian's, all to stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"()": f"{__name__}.LineFormatter", "json_lines": fmt == "json"}},
        "filters": {"quiet_granian": {"()": f"{__name__}.QuietGranian"}},
        "handlers": {
            "console": handler,
            "granian": {**handler, "filters": ["quiet_granian"]},
        },
        "root": {"handlers": ["console"], "level": level.upper()},
        "loggers": {
            GRANIAN_LOGGER: {"handlers": ["granian"], "level": level.upper(), "propagate": False},
            "granian.access": {"handlers": ["console"], "level": "INFO", "propagate": False},
            # migrations say what they did in one line of their own (db.upgrade)
            "alembic": {"level": "WARNING"},
        },
    }


def configure(level: str, fmt: Format) -> None:
    import logging.config

    logging.config.dictConfig(logging_config(level, fmt))
