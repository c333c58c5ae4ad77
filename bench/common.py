"""What every benchmark module shares: where things are, the harness's JWT secret, its error and its log."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = ROOT / ".venv" / "bin"
CLUSTER_ENGINE = (
    str(VENV_BIN / "cluster-engine") if (VENV_BIN / "cluster-engine").exists() else "cluster-engine"
)
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable

JWT_SECRET = "bench-only-hs256-secret-0123456789abcdef0123456789"  # fixed, ≥ 32 chars


class BenchError(RuntimeError):
    """The harness could not produce figures."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    """argparse type: a comma-separated list of positive integers (``_`` allowed as a digit separator)."""
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers, got {text!r}")
    return values
