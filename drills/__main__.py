"""Run reliability drills: ``python -m drills [--short] [NAME ...]`` (from the repository root, inside the
project's environment: ``./dev run python -m drills``).

Each drill prints its figures and every violated expectation; the exit code is 1 if any drill failed.
A full run (without ``--short``) also rewrites that drill's section of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.report import table

from .common import Report

DRILLS = ("soak", "faults", "failover", "crash", "fuzz", "fleet", "hostile")
ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return str(value)


def render(name: str, title: str, report: Report, seconds: float) -> str:
    lines = [
        f"### {title}",
        "",
        f"`./dev run python -m drills {name}` — {'passed' if report.passed else 'FAILED'}, "
        f"{seconds:.0f} s, {dt.datetime.now(dt.UTC):%Y-%m-%d}, {platform.machine()}, "
        f"Python {platform.python_version()}.",
        "",
        *table(["figure", "value"], [(key, _cell(value)) for key, value in report.figures.items()]),
    ]
    if report.failures:
        lines += ["", "Failures:", "", *(f"- {failure}" for failure in report.failures)]
    if report.details:
        lines += ["", *report.details]
    return "\n".join(lines)


def update_doc(name: str, section: str) -> None:
    begin, end = f"<!-- drill:{name} -->", f"<!-- /drill:{name} -->"
    text = DOC.read_text() if DOC.exists() else ""
    block = f"{begin}\n{section}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drills", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"drills to run (default all): {', '.join(DRILLS)}"
    )
    parser.add_argument(
        "--short", action="store_true", help="the short versions CI runs (about a minute each)"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/reliability.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    args = parser.parse_args(argv)
    names = args.names or list(DRILLS)
    unknown = [name for name in names if name not in DRILLS]
    if unknown:
        parser.error(f"unknown drill {', '.join(unknown)}; known: {', '.join(DRILLS)}")
    failed = []
    for name in names:
        module = importlib.import_module(f"drills.{name}")
        workdir = Path(tempfile.mkdtemp(prefix=f"ce-drill-{name}-"))
        print(f"== drill {name}{' (short)' if args.short else ''}: {module.TITLE}", flush=True)
        began = time.monotonic()
        try:
            report: Report = module.run(workdir, short=args.short)
        except Exception:
            report = Report(failures=[f"the drill itself crashed:\n{traceback.format_exc()}"])
        seconds = time.monotonic() - began
        print(json.dumps(report.figures, indent=2, default=str))
        for failure in report.failures:
            print(f"FAIL {name}: {failure}", flush=True)
        print(f"== drill {name}: {'passed' if report.passed else 'FAILED'} in {seconds:.0f} s", flush=True)
        if not report.passed:
            failed.append(name)
            print(f"   work directory kept: {workdir}")
        elif args.keep:
            print(f"   work directory: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if not args.short and not args.no_docs:
            update_doc(name, render(name, module.TITLE, report, seconds))
    if failed:
        print(f"drills failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
