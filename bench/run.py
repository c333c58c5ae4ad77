#!/usr/bin/env python3
"""Benchmark the read path of cluster-engine against a raw-ASGI floor and nginx.

    .venv/bin/python bench/run.py [--sizes 1000,100000,1000000] [--duration 5] [--rounds 3]
                                  [--connections 16,64] [--quick] [--store sqlite|postgresql] [--out FILE.md]

Per catalog size N: generate a deterministic catalog file, load it with ``cluster-engine catalog import``
(timed), start ``cluster-engine serve`` (one worker, pinned to the first CPU), verify every scenario once
with real requests, start the baseline (bench/baseline_app.py on the same Granian setup) and nginx with the
service's exact response bytes, then run ``wrk`` (pinned to the second CPU) against the three servers,
alternating, for ``--rounds`` rounds. Only medians over rounds are reported. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from cluster_engine.server.pids import descendants
from cluster_engine.testing import free_port

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = ROOT / ".venv" / "bin"
CLUSTER_ENGINE = (
    str(VENV_BIN / "cluster-engine") if (VENV_BIN / "cluster-engine").exists() else "cluster-engine"
)
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable

JWT_SECRET = "bench-only-hs256-secret-0123456789abcdef0123456789"  # fixed, ≥ 32 chars
NAMESPACE = uuid.UUID("6f1d3c1e-2b7a-4c55-9e0f-8a4b2d7c9e11")  # uuid5 namespace of every generated id
SEED = 20260101

IDCS = [
    "us-west-1",
    "us-east-1",
    "us-central-2",
    "eu-west-1",
    "eu-north-1",
    "ap-south-1",
    "ap-east-2",
    "me-1",
]
PRODUCTS = [
    "gpu.h100.8x",
    "gpu.h100.4x",
    "gpu.h200.8x",
    "gpu.h200.4x",
    "gpu.b200.8x",
    "gpu.b200.4x",
    "gpu.a100.8x",
    "gpu.a100.4x",
    "gpu.l40s.8x",
    "gpu.l40s.4x",
    "gpu.gb200.4x",
    "gpu.mi300x.8x",
]
N_PUBLIC = 800
PUBLIC_PER_IDC = N_PUBLIC // len(IDCS)
IMAGES_PER_ORG = 20
OPERATOR_ORG = uuid.uuid5(NAMESPACE, "operator")
OS_CHOICES = [
    ("Ubuntu", ["20.04", "22.04", "24.04"]),
    ("Debian", ["11", "12"]),
    ("Rocky", ["8.10", "9.4"]),
    ("AlmaLinux", ["9.4"]),
]
PUBLIC_EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
CUSTOM_EPOCH = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)

SERVERS = ("service", "baseline", "nginx")
SCENARIOS = {
    "filtered": "filtered list ?idc&product",
    "unfiltered": "unfiltered list (org)",
    "not_modified": "filtered + If-None-Match (304)",
    "item": "GET /v1/images/{id} (Public)",
}
HOP_HEADERS = {"date", "server", "connection", "keep-alive", "transfer-encoding"}


class BenchError(RuntimeError):
    """The harness could not produce figures."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ catalog


def org_id(index: int) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, f"org-{index}")


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _image(
    rng: random.Random, *, image_id: uuid.UUID, kind: str, org: uuid.UUID, idc: str, name: str, created: str
) -> tuple[dict[str, Any], list[str]]:
    series, versions = OS_CHOICES[rng.randrange(len(OS_CHOICES))]
    version = versions[rng.randrange(len(versions))]
    count = 4 if kind == "Public" else rng.randint(2, 4)
    products = sorted(rng.sample(PRODUCTS, count), key=PRODUCTS.index)
    disk = f"{rng.choice((100, 200, 500))}G"
    slug = name.lower()
    image = {
        "id": str(image_id),
        "type": kind,
        "orgId": str(org),
        "idc": idc,
        "name": name,
        "path": f"images/{idc}/{slug}.qcow2",
        "OSSeries": series,
        "OSVersion": version,
        "OSArchitecture": "x86_64",
        "BootMode": "UEFI" if rng.random() < 0.9 else "Legacy",
        "SystemDiskSize": disk,
        "DefaultPartitionTable": [
            {"name": "EFI", "mountPoint": "/boot/efi", "size": "512M", "fileSystem": "vfat"},
            {"name": "root", "mountPoint": "/", "size": disk, "fileSystem": "ext4"},
        ],
        "icon": f"https://static.example.com/os-icons/{series.lower()}.svg",
        "supportedProducts": products,
        "createdAt": created,
    }
    return image, products


def public_images() -> Iterator[dict[str, Any]]:
    """The same 800 Public images for every N: 100 per idc, 4 products each (~33 per (idc, product))."""
    rng = random.Random(SEED)
    for index in range(N_PUBLIC):
        idc = IDCS[index // PUBLIC_PER_IDC]
        image, _ = _image(
            rng,
            image_id=uuid.uuid5(NAMESPACE, f"public-{index}"),
            kind="Public",
            org=OPERATOR_ORG,
            idc=idc,
            name=f"Public-{index:04d}",
            created=_stamp(PUBLIC_EPOCH + dt.timedelta(hours=index)),
        )
        yield image


def customized_image(index: int) -> dict[str, Any]:
    """Customized image ``index`` (of org ``index // 20``): the same whatever N is."""
    rng = random.Random(SEED * 1_000_003 + index)
    image, _ = _image(
        rng,
        image_id=uuid.uuid5(NAMESPACE, f"customized-{index}"),
        kind="Customized",
        org=org_id(index // IMAGES_PER_ORG),
        idc=IDCS[rng.randrange(len(IDCS))],
        name=f"Custom-{index:07d}",
        created=_stamp(CUSTOM_EPOCH + dt.timedelta(seconds=37 * index)),
    )
    return image


@dataclasses.dataclass(frozen=True)
class CatalogInfo:
    n: int
    path: Path
    size_bytes: int
    org: uuid.UUID  # the benchmark caller: owns Customized images
    idc: str
    product: str
    expected_filtered: int
    expected_unfiltered: int
    public_id: str


def write_catalog(n: int, path: Path) -> CatalogInfo:
    """Write the N-image catalog as JSON (same N → byte-identical file) and describe the benchmark query."""
    if n <= N_PUBLIC:
        raise BenchError(f"catalog size {n} must exceed the {N_PUBLIC} fixed Public images")
    pair_public: dict[tuple[str, str], int] = {}
    public_id = ""
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n")
        first = True
        for image in public_images():
            public_id = public_id or image["id"]
            for product in image["supportedProducts"]:
                key = (image["idc"], product)
                pair_public[key] = pair_public.get(key, 0) + 1
            out.write(("" if first else ",\n") + json.dumps(image, separators=(",", ":")))
            first = False
        own: list[dict[str, Any]] = []
        org = org_id(0)
        for index in range(n - N_PUBLIC):
            image = customized_image(index)
            if index < IMAGES_PER_ORG:
                own.append(image)
            out.write(",\n" + json.dumps(image, separators=(",", ":")))
        out.write("\n]\n")
    pair_own: dict[tuple[str, str], int] = {}
    for image in own:
        for product in image["supportedProducts"]:
            key = (image["idc"], product)
            pair_own[key] = pair_own.get(key, 0) + 1
    # The query: an (idc, product) where the caller has Customized images too (so the public/own merge
    # runs), with a total as close to 30 as possible; deterministic, and the same answer at every N.
    candidates = sorted(
        pair_own, key=lambda k: (abs(pair_public.get(k, 0) + pair_own[k] - 30), IDCS.index(k[0]), k[1])
    )
    idc, product = candidates[0]
    return CatalogInfo(
        n=n,
        path=path,
        size_bytes=path.stat().st_size,
        org=org,
        idc=idc,
        product=product,
        expected_filtered=pair_public.get((idc, product), 0) + pair_own[(idc, product)],
        expected_unfiltered=N_PUBLIC + len(own),
        public_id=public_id,
    )


# ---------------------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Cores:
    server: list[str]  # prefix for server processes, e.g. ["taskset", "-c", "0"]
    load: list[str]
    description: str

    @classmethod
    def detect(cls) -> Cores:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cpus) >= 2 and shutil.which("taskset"):
            return cls(
                ["taskset", "-c", str(cpus[0])],
                ["taskset", "-c", str(cpus[1])],
                f"servers pinned to CPU {cpus[0]}, wrk to CPU {cpus[1]} ({len(cpus)} CPUs available)",
            )
        return cls([], [], f"not pinned ({len(cpus) or os.cpu_count()} CPU(s) available)")


class Process:
    """A child in its own process group; ``stop`` takes the whole group down (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log_file:
            self.popen = subprocess.Popen(
                list(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; make sure no straggler of its group survives it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            return


def rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def wait_http(url: str, process: Process, timeout: float, expect: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}")
        try:
            response = httpx.get(url, timeout=5.0)
            if response.status_code == expect:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = exc.__class__.__name__
        time.sleep(0.1)
    raise BenchError(
        f"{process.name} not ready at {url} after {timeout:.0f}s ({last}):\n{process.log_tail()}"
    )


def run_checked(argv: Sequence[str], env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} … failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def run_measured(
    argv: Sequence[str], env: dict[str, str], timeout: float, workdir: Path
) -> tuple[str, float, int]:
    """Run to completion; return (stdout, wall seconds, peak RSS in KiB) — the peak from ``wait4``."""
    out_path, err_path = workdir / "measured.out", workdir / "measured.err"
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        popen = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{' '.join(argv[:4])} … still running after {timeout:.0f}s")
            time.sleep(0.05)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(popen.pid, 0)
        raise
    popen.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    if popen.returncode != 0:
        detail = err_path.read_text(errors="replace")[-3000:]
        raise BenchError(
            f"{' '.join(argv[:4])} … failed ({popen.returncode}) after {elapsed:.1f}s,"
            f" peak RSS {usage.ru_maxrss / 1024:.0f} MiB:\n{detail}"
        )
    return out_path.read_text(errors="replace"), elapsed, usage.ru_maxrss


# ------------------------------------------------------------------------------------------- stores


class Store:
    """Where the service's database lives for one N: a fresh SQLite file or a fresh PostgreSQL database."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.pg: Any = None

    def __enter__(self) -> Store:
        if self.kind == "postgresql":
            from cluster_engine.testing.pgserver import PostgresServer

            log("starting a throwaway PostgreSQL server")
            self.pg = PostgresServer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.pg is not None:
            self.pg.destroy()

    def env_for(self, n: int) -> dict[str, str]:
        data_dir = self.workdir / f"data-{n}"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CE_DATA_DIR": str(data_dir), "CE_JWT_SECRET": JWT_SECRET}
        for key in _DROPPED_BY_BENCH:
            env.pop(key, None)
        if self.kind == "postgresql":
            env["CE_DATABASE_URL"] = self.pg.create_database()
        else:
            env["CE_DATABASE_URL"] = f"sqlite:///{data_dir / 'cluster-engine.db'}"
        return env


# ---------------------------------------------------------------------------------------------- wrk


@dataclasses.dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx responses + socket errors


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchError(f"unparseable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"could not parse wrk output:\n{output}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sockets:
        errors += sum(int(value) for value in sockets.groups())
    return WrkResult(float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), int(total.group(1)), errors)


def run_wrk(
    cores: Cores, url: str, headers: dict[str, str], connections: int, duration: int
) -> tuple[WrkResult, str]:
    argv = [*cores.load, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if result.returncode != 0:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return parse_wrk(result.stdout), result.stdout


# ---------------------------------------------------------------------------------------- scenarios


@dataclasses.dataclass
class Scenario:
    key: str
    path: str
    query: str
    headers: dict[str, str]  # request headers besides Authorization
    status: int = 0
    response_headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    etag: str = ""
    headers_304: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")

    @property
    def file_name(self) -> str:
        return f"{self.key}.body"


def scenarios_for(info: CatalogInfo) -> list[Scenario]:
    query = f"idc={info.idc}&product={info.product}"
    found = [Scenario("filtered", "/v1/images", query, {})]
    if info.n == 1000:
        found.append(Scenario("unfiltered", "/v1/images", "", {}))
    found.append(Scenario("not_modified", "/v1/images", query, {}))
    found.append(Scenario("item", f"/v1/images/{info.public_id}", "", {}))
    return found


def _kept_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(name, value) for name, value in response.headers.items() if name.lower() not in HOP_HEADERS]


def capture(base: str, token: str, info: CatalogInfo, scenarios: list[Scenario]) -> list[str]:
    """Fetch each scenario's real answer from the service, check it, keep its bytes; return check notes."""
    notes: list[str] = []
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=30.0) as client:
        for scenario in scenarios:
            if scenario.key == "not_modified":
                continue
            response = client.get(scenario.target, headers=auth)
            if response.status_code != 200:
                raise BenchError(
                    f"{scenario.key}: {scenario.target} → {response.status_code} {response.text[:300]}"
                )
            data = response.json()
            scenario.status, scenario.body = 200, response.content
            scenario.response_headers = _kept_headers(response)
            scenario.etag = response.headers.get("etag", "")
            if scenario.key == "filtered":
                if len(data) != info.expected_filtered:
                    raise BenchError(
                        f"filtered list has {len(data)} images, expected {info.expected_filtered}"
                    )
                bad = [i for i in data if i["idc"] != info.idc or info.product not in i["supportedProducts"]]
                if bad:
                    raise BenchError(f"filtered list holds {len(bad)} images outside the filter")
                own = sum(1 for i in data if i["type"] == "Customized")
                notes.append(f"filtered `{scenario.target}`: {len(data)} images ({own} of the caller's own)")
            elif scenario.key == "unfiltered":
                if len(data) != info.expected_unfiltered:
                    raise BenchError(
                        f"unfiltered list has {len(data)} images, expected {info.expected_unfiltered}"
                    )
                notes.append(f"unfiltered `{scenario.target}`: {len(data)} images")
            elif scenario.key == "item" and data.get("id") != info.public_id:
                raise BenchError(f"item answered id {data.get('id')!r}, expected {info.public_id}")
        filtered = next(s for s in scenarios if s.key == "filtered")
        if not filtered.etag:
            raise BenchError("the filtered list has no ETag")
        for scenario in scenarios:
            if scenario.key != "not_modified":
                continue
            scenario.headers = {"If-None-Match": filtered.etag}
            scenario.etag = filtered.etag
            response = client.get(scenario.target, headers={**auth, **scenario.headers})
            if response.status_code != 304 or response.content:
                raise BenchError(f"If-None-Match answered {response.status_code}, expected an empty 304")
            scenario.status, scenario.body = 304, b""
            scenario.response_headers = scenario.headers_304 = _kept_headers(response)
            filtered.headers_304 = scenario.headers_304
            notes.append(f"If-None-Match {filtered.etag} → 304 (verified)")
    return notes


def write_baseline_responses(path: Path, scenarios: list[Scenario]) -> None:
    spec: list[dict[str, Any]] = []
    for scenario in scenarios:
        if scenario.key == "not_modified":
            continue  # served by the filtered route: same (path, query), If-None-Match decides
        spec.append(
            {
                "path": scenario.path,
                "query": scenario.query,
                "status": scenario.status,
                "headers": scenario.response_headers,
                "body_b64": base64.b64encode(scenario.body).decode(),
                "etag": scenario.etag if scenario.headers_304 else "",
                "headers_304": scenario.headers_304 or None,
            }
        )
    path.write_text(json.dumps(spec), encoding="utf-8")


def _nginx_quote(value: str) -> str:
    if "'" in value or "\\" in value:
        raise BenchError(f"cannot quote {value!r} for nginx")
    return f"'{value}'"


def write_nginx_config(workdir: Path, port: int, scenarios: list[Scenario]) -> Path:
    """Static files with the service's bytes; the request URI picks the file, If-None-Match the 304."""
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    files, etags, not_modified = [], [], []
    types: set[str] = set()
    for scenario in scenarios:
        if scenario.key == "not_modified":
            continue
        (www / scenario.file_name).write_bytes(scenario.body)
        files.append(f"        {_nginx_quote(scenario.target)} {scenario.file_name};")
        headers = dict((k.lower(), v) for k, v in scenario.response_headers)
        etags.append(f"        {scenario.file_name} {_nginx_quote(headers.get('etag', ''))};")
        types.add(headers.get("content-type", ""))
        if scenario.headers_304:
            not_modified.append(f"        {_nginx_quote(scenario.file_name + '|' + scenario.etag)} 1;")
    if len(types) != 1:
        raise BenchError(f"nginx serves one content type; the service answered {sorted(types)}")
    content_type = types.pop()
    user = "user root root;" if os.geteuid() == 0 else ""
    tmp = workdir / "tmp"
    config = f"""\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    open_file_cache max=64 inactive=60s;
    open_file_cache_valid 3600s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map_hash_bucket_size 256;
    types {{ {_nginx_quote(content_type)} body; }}
    default_type application/octet-stream;
    map $request_uri $bench_file {{
        default '';
{chr(10).join(files)}
    }}
    map $bench_file $bench_etag {{
        default '';
{chr(10).join(etags)}
    }}
    map "$bench_file|$http_if_none_match" $bench_not_modified {{
        default 0;
{chr(10).join(not_modified)}
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {www};
        etag off;
        if_modified_since off;
        add_header Last-Modified '';
        add_header ETag $bench_etag;
        add_header Cache-Control 'private, max-age=0';
        location / {{
            if ($bench_not_modified) {{ return 304; }}
            try_files /$bench_file =404;
        }}
    }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(config, encoding="utf-8")
    return path


def check_replica(name: str, base: str, token: str, scenarios: list[Scenario]) -> None:
    """The baseline and nginx must answer each scenario with the service's status and body."""
    with httpx.Client(base_url=base, timeout=30.0) as client:
        for scenario in scenarios:
            response = client.get(
                scenario.target, headers={"Authorization": f"Bearer {token}", **scenario.headers}
            )
            if response.status_code != scenario.status or response.content != scenario.body:
                raise BenchError(
                    f"{name} answers {scenario.key} with {response.status_code},"
                    f" {len(response.content)} bytes; the service with {scenario.status},"
                    f" {len(scenario.body)} bytes"
                )
            want_type = dict((k.lower(), v) for k, v in scenario.response_headers).get("content-type")
            if scenario.status == 200 and response.headers.get("content-type") != want_type:
                raise BenchError(
                    f"{name}: {scenario.key} content-type {response.headers.get('content-type')!r}"
                )
            if response.headers.get("etag") != (scenario.etag or None):
                raise BenchError(
                    f"{name}: {scenario.key} ETag {response.headers.get('etag')!r} ≠ {scenario.etag!r}"
                )


# -------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class SizeReport:
    n: int
    file_mb: float
    import_s: float
    import_rss_kib: int
    import_output: str
    startup_s: float
    rss_worker_kib: int | None
    rss_main_kib: int | None
    rss_after_kib: int | None
    notes: list[str]
    body_bytes: dict[str, int]
    # (scenario, connections, server) → one WrkResult per round
    results: dict[tuple[str, int, str], list[WrkResult]]


@dataclasses.dataclass
class Options:
    sizes: list[int]
    duration: int
    rounds: int
    connections: list[int]
    quick: bool
    store: str
    out: Path | None
    keep: bool


def _start_service(env: dict[str, str], cores: Cores, workdir: Path, n: int) -> tuple[Process, str, float]:
    port = free_port()
    argv = [*cores.server, CLUSTER_ENGINE, "serve", "--port", str(port), "--log-level", "warning"]
    started = time.monotonic()
    service = Process("cluster-engine serve", argv, env, workdir / f"service-{n}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz", service, timeout=120 + n / 2000)
    except BaseException:
        service.stop()
        raise
    return service, base, time.monotonic() - started


def _worker_rss(service: Process) -> tuple[int | None, int | None]:
    children = descendants(service.pid)
    worker = max(children, key=lambda pid: rss_kib(pid) or 0) if children else None
    return (rss_kib(worker) if worker else None), rss_kib(service.pid)


def import_catalog(
    n: int, store: Store, env: dict[str, str], path: Path, sizedir: Path
) -> tuple[str, float, int]:
    """Migrate a PostgreSQL store, then import the catalog file ``path`` with ``cluster-engine catalog
    import``, measured: its output, its seconds and its peak RSS in KiB."""
    if store.kind == "postgresql":
        run_checked([CLUSTER_ENGINE, "db", "upgrade"], env, timeout=300)
    log(f"N={n}: importing {path.stat().st_size / 1e6:.1f} MB with `cluster-engine catalog import`")
    output, import_s, import_rss = run_measured(
        [CLUSTER_ENGINE, "catalog", "import", str(path)], env, 6 * 3600, sizedir
    )
    log(f"N={n}: import took {import_s:.1f}s (peak RSS {import_rss / 1024:.0f} MiB): {output.strip()}")
    return output, import_s, import_rss


def bench_size(n: int, opts: Options, cores: Cores, store: Store, workdir: Path) -> SizeReport:
    sizedir = workdir / f"n{n}"
    sizedir.mkdir()
    catalog_path = sizedir / "catalog.json"
    log(f"N={n}: generating {catalog_path}")
    info = write_catalog(n, catalog_path)
    env = store.env_for(n)
    output, import_s, import_rss = import_catalog(n, store, env, catalog_path, sizedir)
    token = run_checked([CLUSTER_ENGINE, "token", "--org", str(info.org), "--ttl", "12h"], env, 60).strip()

    processes: list[Process] = []
    try:
        service, base, startup_s = _start_service(env, cores, sizedir, n)
        processes.append(service)
        log(f"N={n}: service ready at {base} after {startup_s:.1f}s")
        scenarios = scenarios_for(info)
        notes = capture(base, token, info, scenarios)
        rss_worker, rss_main = _worker_rss(service)

        responses = sizedir / "baseline-responses.json"
        write_baseline_responses(responses, scenarios)
        baseline_port = free_port()
        baseline = Process(
            "baseline",
            [
                *cores.server,
                PYTHON,
                str(BENCH_DIR / "baseline_app.py"),
                *("--port", str(baseline_port), "--responses", str(responses)),
            ],
            dict(os.environ),
            sizedir / "baseline.log",
        )
        processes.append(baseline)
        nginx_port = free_port()
        nginx_dir = sizedir / "nginx"
        config = write_nginx_config(nginx_dir, nginx_port, scenarios)
        nginx = Process(
            "nginx",
            [*cores.server, shutil.which("nginx") or "nginx", "-c", str(config), "-p", str(nginx_dir)],
            {"PATH": os.environ.get("PATH", os.defpath)},
            sizedir / "nginx.log",
        )
        processes.append(nginx)
        bases = {
            "service": base,
            "baseline": f"http://127.0.0.1:{baseline_port}",
            "nginx": f"http://127.0.0.1:{nginx_port}",
        }
        first = scenarios[0].target
        wait_http(bases["baseline"] + first, baseline, timeout=60)
        wait_http(bases["nginx"] + first, nginx, timeout=30)
        check_replica("baseline", bases["baseline"], token, scenarios)
        check_replica("nginx", bases["nginx"], token, scenarios)

        if not opts.quick:
            log(f"N={n}: warming up")
            for server in SERVERS:
                for scenario in scenarios:
                    run_wrk(cores, bases[server] + scenario.target, _headers(token, scenario), 16, 1)

        results: dict[tuple[str, int, str], list[WrkResult]] = {}
        cells = len(scenarios) * len(opts.connections) * len(SERVERS)
        for round_index in range(opts.rounds):
            order = SERVERS[round_index % 3 :] + SERVERS[: round_index % 3]
            log(f"N={n}: round {round_index + 1}/{opts.rounds} ({cells} runs of {opts.duration}s)")
            for scenario in scenarios:
                for connections in opts.connections:
                    for server in order:
                        for process in processes:
                            if not process.alive():
                                raise BenchError(f"{process.name} died:\n{process.log_tail()}")
                        result, _ = run_wrk(
                            cores,
                            bases[server] + scenario.target,
                            _headers(token, scenario),
                            connections,
                            opts.duration,
                        )
                        results.setdefault((scenario.key, connections, server), []).append(result)
        rss_after, _ = _worker_rss(service)
        return SizeReport(
            n=n,
            file_mb=info.size_bytes / 1e6,
            import_s=import_s,
            import_rss_kib=import_rss,
            import_output=output.strip(),
            startup_s=startup_s,
            rss_worker_kib=rss_worker,
            rss_main_kib=rss_main,
            rss_after_kib=rss_after,
            notes=notes,
            body_bytes={s.key: len(s.body) for s in scenarios},
            results=results,
        )
    finally:
        for process in reversed(processes):
            process.stop()
        if not opts.keep:
            with contextlib.suppress(OSError):
                catalog_path.unlink()


def _headers(token: str, scenario: Scenario) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **scenario.headers}


# ----------------------------------------------------------------------------------------- report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _fmt_rps(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def _fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) or math.isinf(value) else f"{value:.2f}"


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f}"


def render_report(reports: list[SizeReport], opts: Options, cores: Cores, versions: dict[str, str]) -> str:
    lines = [
        "# cluster-engine read-path benchmark",
        "",
        f"- store: {opts.store}; rounds: {opts.rounds}; wrk runs of {opts.duration}s, `-t1`,"
        f" connections {', '.join(map(str, opts.connections))}; medians over rounds (servers alternated)",
        f"- {versions.get('source', 'src at ?')}; service configuration: {_service_config()}",
        f"- {cores.description}; {versions.get('granian', '?')}, loop {versions.get('loop', '?')};"
        f" {versions.get('wrk', '?')}; {versions.get('nginx', '?')}",
        "- baseline: raw ASGI app on the same Granian setup returning the service's precomputed bytes;"
        " nginx: one worker, the same bytes as static files (304 via `return 304`)",
        "",
        "## Import, start-up and memory",
        "",
        "| N | catalog file MB | import s | import peak RSS MiB | import result | serve start-up s"
        " | worker RSS MiB (after load) | main RSS MiB |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.n:,} | {r.file_mb:.1f} | {r.import_s:.1f} | {_mib(r.import_rss_kib)} | {r.import_output} |"
            f" {r.startup_s:.1f} |"
            f" {_mib(r.rss_worker_kib)} ({_mib(r.rss_after_kib)}) | {_mib(r.rss_main_kib)} |"
        )
    for r in reports:
        lines += ["", f"## N = {r.n:,}", ""]
        lines += [f"- {note}" for note in r.notes]
        lines += [
            "",
            "| scenario | body B | conns | req/s svc | req/s base | req/s nginx | svc÷base | svc÷nginx"
            " | p50 ms svc / base / nginx | p99 ms svc / base / nginx | p99 svc÷base"
            " | errors svc / base / nginx |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
        ]
        for key, title in SCENARIOS.items():
            for connections in opts.connections:
                cells = {s: r.results.get((key, connections, s), []) for s in SERVERS}
                if not cells["service"]:
                    continue
                rps = {s: _median([x.rps for x in cells[s]]) for s in SERVERS}
                p50 = {s: _median([x.p50_ms for x in cells[s]]) for s in SERVERS}
                p99 = {s: _median([x.p99_ms for x in cells[s]]) for s in SERVERS}
                errors = {s: _median([x.errors for x in cells[s]]) for s in SERVERS}
                lines.append(
                    f"| {title} | {r.body_bytes.get(key, 0):,} | {connections} |"
                    f" {_fmt_rps(rps['service'])} | {_fmt_rps(rps['baseline'])} | {_fmt_rps(rps['nginx'])} |"
                    f" {_fmt_ratio(_div(rps['service'], rps['baseline']))} |"
                    f" {_fmt_ratio(_div(rps['service'], rps['nginx']))} |"
                    f" {' / '.join(_fmt_ms(p50[s]) for s in SERVERS)} |"
                    f" {' / '.join(_fmt_ms(p99[s]) for s in SERVERS)} |"
                    f" {_fmt_ratio(_div(p99['service'], p99['baseline']))} |"
                    f" {' / '.join(f'{errors[s]:g}' for s in SERVERS)} |"
                )
    if reports:
        reference = next((r for r in reports if r.n == 1000), reports[0])
        lines += [
            "",
            f"## Scale check: filtered list req/s (service) relative to N = {reference.n:,}",
            "",
            "The answer is the same at every N. `ratio` compares raw req/s, which also moves with the"
            " machine's load between the N phases; `ratio ÷ baseline ratio` divides out the baseline's"
            " drift over the same phases (it is (svc÷base at N) ÷ (svc÷base at the reference)).",
            "",
            "| N | conns | req/s | ratio | ratio ÷ baseline ratio | p99 ms |",
            "|---:|---:|---:|---:|---:|---:|",
        ]

        def rps_of(report: SizeReport, connections: int, server: str) -> float:
            return _median([x.rps for x in report.results.get(("filtered", connections, server), [])])

        for r in reports:
            for connections in opts.connections:
                rps = rps_of(r, connections, "service")
                ratio = _div(rps, rps_of(reference, connections, "service"))
                base_ratio = _div(
                    rps_of(r, connections, "baseline"), rps_of(reference, connections, "baseline")
                )
                p99 = _median([x.p99_ms for x in r.results.get(("filtered", connections, "service"), [])])
                lines.append(
                    f"| {r.n:,} | {connections} | {_fmt_rps(rps)} | {_fmt_ratio(ratio)} |"
                    f" {_fmt_ratio(_div(ratio, base_ratio))} | {_fmt_ms(p99)} |"
                )
    return "\n".join(lines) + "\n"


_SET_BY_BENCH = {"CE_DATA_DIR", "CE_DATABASE_URL", "CE_JWT_SECRET"}
_DROPPED_BY_BENCH = {"CE_JWT_PUBLIC_KEY", "CE_JWT_JWKS", "CE_JWT_ISSUER", "CE_JWT_AUDIENCE"}


def _service_config() -> str:
    extra = sorted(
        k for k in os.environ if k.startswith("CE_") and k not in _SET_BY_BENCH | _DROPPED_BY_BENCH
    )
    if not extra:
        return "defaults (the harness sets only CE_DATA_DIR, CE_DATABASE_URL, CE_JWT_SECRET)"
    return "defaults plus " + ", ".join(f"`{k}={os.environ[k]}`" for k in extra)


def versions() -> dict[str, str]:
    found: dict[str, str] = {}
    with contextlib.suppress(Exception):
        script = (
            "import granian, importlib.util as u; print(granian.__version__, bool(u.find_spec('uvloop')))"
        )
        version, uvloop = subprocess.run(
            [PYTHON, "-c", script], capture_output=True, text=True, timeout=30
        ).stdout.split()
        found["granian"] = f"granian {version}"
        found["loop"] = "uvloop" if uvloop == "True" else "asyncio"
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        found["source"] = f"src at {head}" + (" + uncommitted changes" if dirty else "")
    with contextlib.suppress(Exception):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
        found["wrk"] = (out.stdout or out.stderr).split("Copyright")[0].strip()
    with contextlib.suppress(Exception):
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
        found["nginx"] = (out.stderr or out.stdout).strip().replace("nginx version: ", "")
    return found


# ------------------------------------------------------------------------------------------- main


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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=_int_list, default=[1000, 100_000], help="catalog sizes N (≥ 801)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds; medians are reported")
    parser.add_argument("--connections", type=_int_list, default=[16, 64], help="wrk connection counts")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N=1000, 2 s, 1 round, 64 connections"
    )
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown summary here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (catalogs, logs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.duration, args.rounds, args.connections = [1000], 2, 1, [64]
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    if any(n <= N_PUBLIC for n in args.sizes):
        parser.error(f"every size must exceed the {N_PUBLIC} fixed Public images")
    return Options(
        sizes=args.sizes,
        duration=args.duration,
        rounds=args.rounds,
        connections=args.connections,
        quick=args.quick,
        store=args.store,
        out=args.out,
        keep=args.keep,
    )


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


R = TypeVar("R")


def run_sizes(
    prefix: str,
    opts: Any,
    found_versions: dict[str, str],
    bench_size: Callable[[int, Cores, Store, Path], R],
    render: Callable[[list[R], Cores, dict[str, str]], str],
    on_report: Callable[[int, R], None] = lambda _n, _report: None,
) -> int:
    """The frame both benchmarks share: a work directory, one store, ``bench_size`` for each of
    ``opts.sizes``, the Markdown report printed (and written to ``opts.out``), or on a failure what was
    measured so far; SIGTERM and SIGHUP end it through the same clean-up."""
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
        text = render(reports, cores, found_versions)
        print(text)
        if opts.out:
            opts.out.write_text(text, encoding="utf-8")
        log(f"done in {time.monotonic() - started:.0f}s")
        return 0
    except (BenchError, subprocess.SubprocessError, OSError, httpx.HTTPError) as exc:
        log(f"FAILED: {exc.__class__.__name__}: {exc}")
        if reports:
            print(render(reports, cores, found_versions))
        return 1
    finally:
        if opts.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _log_size(n: int, report: SizeReport) -> None:
    log(
        f"N={n}: import {report.import_s:.1f}s, worker RSS {_mib(report.rss_worker_kib)} MiB"
        f" ({_mib(report.rss_after_kib)} MiB after the benchmark)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    found_versions = versions()  # at the start: src/ may change while the benchmark runs
    return run_sizes(
        "ce-bench-",
        opts,
        found_versions,
        lambda n, cores, store, workdir: bench_size(n, opts, cores, store, workdir),
        lambda reports, cores, found: render_report(reports, opts, cores, found),
        _log_size,
    )


if __name__ == "__main__":
    sys.exit(main())
