"""The frame ``bench run`` and ``bench orgs`` share: their common options, the tools they need, the
versions and configuration their reports state, and the loop over catalog sizes with its clean-up."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from .common import PYTHON, ROOT, BenchError, int_list, log
from .processes import DROPPED_BY_BENCH, SET_BY_BENCH, Cores, Store


def parser(doc: str | None, sizes: list[int], min_size: int) -> argparse.ArgumentParser:
    """The options both benchmarks take (the tool adds its own)."""
    found = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    found.add_argument("--sizes", type=int_list, default=sizes, help=f"catalog sizes N (≥ {min_size + 1})")
    found.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    found.add_argument("--out", type=Path, default=None, help="also write the Markdown summary here")
    found.add_argument("--keep", action="store_true", help="keep the work directory (catalogs, logs)")
    return found


def ensure_tools() -> None:
    missing = [
        (tool, package)
        for tool, package in (("wrk", "wrk"), ("nginx", "nginx-light"))
        if not shutil.which(tool)
    ]
    if not missing:
        return
    packages = [package for _, package in missing]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(
            f"missing {', '.join(t for t, _ in missing)}: apt-get install -y {' '.join(packages)}"
        )
    log(f"installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", *packages], env=env, check=False, timeout=900)
    if any(not shutil.which(tool) for tool, _ in missing):
        subprocess.run(["apt-get", "update"], env=env, check=False, timeout=900)
        subprocess.run(["apt-get", "install", "-y", *packages], env=env, check=True, timeout=900)


def service_config(service_env: dict[str, str] | None = None) -> str:
    """The service's ``CE_*`` settings besides the harness's own: from this environment, then
    ``service_env`` (``bench run --service-env``), which wins."""
    skipped = SET_BY_BENCH | DROPPED_BY_BENCH
    values = {k: v for k, v in os.environ.items() if k.startswith("CE_") and k not in skipped}
    values |= service_env or {}
    if not values:
        return "defaults (the harness sets only CE_DATA_DIR, CE_DATABASE_URL, CE_JWT_SECRET)"
    return "defaults plus " + ", ".join(f"`{k}={values[k]}`" for k in sorted(values))


def _output(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def src_changes() -> str:
    """The uncommitted files under src/, with a digest of their names and contents ("" when none)."""
    with contextlib.suppress(Exception):
        out = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]).stdout
        files = sorted(line[3:] for line in out.splitlines() if line.strip())
        if files:
            digest = hashlib.sha256()
            for name in files:
                digest.update(name.encode() + b"\0")
                with contextlib.suppress(OSError):
                    digest.update((ROOT / name).read_bytes())
            return (
                " (uncommitted: "
                + ", ".join(f"`{f}`" for f in files)
                + f"; sha256 of their names and contents {digest.hexdigest()[:12]})"
            )
    return ""


def versions(detailed_changes: bool = False) -> dict[str, str]:
    """granian, the event loop, the source commit, wrk and nginx; with ``detailed_changes``, src/'s
    uncommitted files by name and digest rather than a mere "+ uncommitted changes"."""
    found: dict[str, str] = {}
    with contextlib.suppress(Exception):
        script = (
            "import granian, importlib.util as u; print(granian.__version__, bool(u.find_spec('uvloop')))"
        )
        version, uvloop = _output([PYTHON, "-c", script]).stdout.split()
        found["granian"] = f"granian {version}"
        found["loop"] = "uvloop" if uvloop == "True" else "asyncio"
    with contextlib.suppress(Exception):
        head = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
        if detailed_changes:
            found["source"] = f"src at {head}" + src_changes()
        else:
            dirty = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]).stdout.strip()
            found["source"] = f"src at {head}" + (" + uncommitted changes" if dirty else "")
    with contextlib.suppress(Exception):
        out = _output(["wrk", "--version"])
        found["wrk"] = (out.stdout or out.stderr).split("Copyright")[0].strip()
    with contextlib.suppress(Exception):
        out = _output(["nginx", "-v"])
        found["nginx"] = (out.stderr or out.stdout).strip().replace("nginx version: ", "")
    return found


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


R = TypeVar("R")


def run_sizes(
    prefix: str,
    opts: Any,
    bench_size: Callable[[int, Cores, Store, Path], R],
    render: Callable[[list[R], Cores], str],
    on_report: Callable[[int, R], None] = lambda _n, _report: None,
) -> int:
    """A work directory, one store, ``bench_size`` for each of ``opts.sizes``, the Markdown report printed
    (and written to ``opts.out``), or on a failure what was measured so far; SIGTERM and SIGHUP end it
    through the same clean-up."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    reports: list[R] = []
    cores = Cores.detect()
    try:
        ensure_tools()
        log(cores.description)
        with Store(opts.store, workdir) as store:
            for n in opts.sizes:
                report = bench_size(n, cores, store, workdir)
                reports.append(report)
                on_report(n, report)
        text = render(reports, cores)
        print(text)
        if opts.out:
            opts.out.write_text(text, encoding="utf-8")
        log(f"done in {time.monotonic() - started:.0f}s")
        return 0
    except (BenchError, subprocess.SubprocessError, OSError, httpx.HTTPError) as exc:
        log(f"FAILED: {exc.__class__.__name__}: {exc}")
        if reports:
            print(render(reports, cores))
        return 1
    finally:
        if opts.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
