"""The three floors ``bench run`` compares the service with, serving its exact answers: the raw app of
bench/baseline_app.py on the same Granian setup over ASGI and over RSGI, and nginx with the bytes as static
files."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cluster_engine.testing import free_port

from .common import BENCH_DIR, PYTHON, BenchError
from .processes import Cores, Process, wait_http
from .scenarios import Scenario, check_replica


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


_NGINX_CONFIG = """\
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
    types {{ {content_type} body; }}
    default_type application/octet-stream;
    map $request_uri $bench_file {{
        default '';
{files}
    }}
    map $bench_file $bench_etag {{
        default '';
{etags}
    }}
    map "$bench_file|$http_if_none_match" $bench_not_modified {{
        default 0;
{not_modified}
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


def write_nginx_config(workdir: Path, port: int, scenarios: list[Scenario]) -> Path:
    """Static files with the service's bytes; the request URI picks the file, If-None-Match the 304."""
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    tmp = workdir / "tmp"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    files, etags, not_modified = [], [], []
    types: set[str] = set()
    for scenario in scenarios:
        if scenario.key == "not_modified":
            continue
        (www / scenario.file_name).write_bytes(scenario.body)
        files.append(f"        {_nginx_quote(scenario.target)} {scenario.file_name};")
        etags.append(f"        {scenario.file_name} {_nginx_quote(scenario.header('etag') or '')};")
        types.add(scenario.header("content-type") or "")
        if scenario.headers_304:
            not_modified.append(f"        {_nginx_quote(scenario.file_name + '|' + scenario.etag)} 1;")
    if len(types) != 1:
        raise BenchError(f"nginx serves one content type; the service answered {sorted(types)}")
    config = _NGINX_CONFIG.format(
        user="user root root;" if os.geteuid() == 0 else "",
        workdir=workdir,
        tmp=tmp,
        www=www,
        port=port,
        content_type=_nginx_quote(types.pop()),
        files="\n".join(files),
        etags="\n".join(etags),
        not_modified="\n".join(not_modified),
    )
    path = workdir / "nginx.conf"
    path.write_text(config, encoding="utf-8")
    return path


FLOORS = ("asgi", "rsgi", "nginx")  # the names ``start_floors`` gives its processes


def start_floors(
    cores: Cores, sizedir: Path, token: str, scenarios: list[Scenario]
) -> tuple[dict[str, Process], dict[str, str]]:
    """The raw ASGI and raw RSGI baselines and nginx with the service's captured answers, each ready and
    checked against them: their processes and base URLs, by name (``FLOORS``). The caller stops the
    processes."""
    responses = sizedir / "baseline-responses.json"
    write_baseline_responses(responses, scenarios)
    ports = {name: free_port() for name in FLOORS}
    nginx_dir = sizedir / "nginx"
    config = write_nginx_config(nginx_dir, ports["nginx"], scenarios)

    def baseline(interface: str) -> list[str]:
        return [
            *(PYTHON, str(BENCH_DIR / "baseline_app.py"), "--interface", interface),
            *("--port", str(ports[interface]), "--responses", str(responses)),
        ]

    argv = {
        "asgi": baseline("asgi"),
        "rsgi": baseline("rsgi"),
        "nginx": [shutil.which("nginx") or "nginx", "-c", str(config), "-p", str(nginx_dir)],
    }
    path_only = {"PATH": os.environ.get("PATH", os.defpath)}
    envs = {"asgi": dict(os.environ), "rsgi": dict(os.environ), "nginx": path_only}
    timeouts = {"asgi": 60, "rsgi": 60, "nginx": 30}
    started: dict[str, Process] = {}
    bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        for name in FLOORS:
            process = Process(name, [*cores.server, *argv[name]], envs[name], sizedir / f"{name}.log")
            started[name] = process
            wait_http(bases[name] + scenarios[0].target, process, timeout=timeouts[name])
            check_replica(name, bases[name], token, scenarios)
    except BaseException:
        for process in started.values():
            process.stop()
        raise
    return started, bases
