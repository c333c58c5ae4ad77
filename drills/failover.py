"""Failover: a PostgreSQL pair managed by Patroni (etcd as its store, synchronous replication on), two
service replicas with a multi-host database URL (``target_session_attrs=read-write``), mixed load on
both, and the primary's machine dies (SIGKILL of its Patroni, its postmaster and every backend).

Everything runs on loopback, on free ports, with data under the work directory: one etcd member, two
Patroni nodes (each runs its own PostgreSQL as the ``postgres`` OS user), two servers (1 worker each).
The Patroni settings are deploy/ha/patroni.yml's (ttl 10 s, loop_wait 1 s, retry_timeout 4 s,
``synchronous_mode``), filled in with the drill's ports and directories.

Measured: answers by status, answers outside the contract (2xx, or 503 with the error body: anything else,
and any request left without an answer, fails the drill), the longest response, the time from the kill
until Patroni reports the surviving node as leader, the time until creates succeed again (and stay
successful), and, on the new primary, that every acknowledged write is there (synchronous replication:
none may be lost). The full version fails back: the dead node is restarted, rejoins as the synchronous
standby (pg_rewind), and then the new primary is killed too.

Needs Debian's ``patroni`` and ``etcd-server`` packages: installed with apt-get when missing and running
as root (service start-up suppressed, so nothing system-wide keeps running), else the drill says so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from cluster_engine.server.pids import descendants
from cluster_engine.testing import LiveServer, free_port
from cluster_engine.testing.pgserver import find_bindir

from .common import (
    Load,
    Outcome,
    Report,
    check_answers,
    recovery_after,
    seed_catalog,
    summarize,
    verify_ledger,
)

NAME = "failover"
TITLE = "Failover: the primary of a Patroni pair (synchronous replication) dies under mixed load"

PACKAGES = ("patroni", "etcd-server")
OS_USER = "postgres"  # PostgreSQL refuses to run as root; Patroni runs it, so Patroni runs as this user
SCOPE = "cluster-engine"
DATABASE = "cluster_engine"
ORGS = 20
TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "ha" / "patroni.yml"


# ------------------------------------------------------------------------------------------- install


def _policy_guard() -> contextlib.AbstractContextManager[None]:
    """While installing: forbid maintainer scripts to start services (Debian's policy-rc.d protocol;
    deb-systemd-invoke honours it too). An existing policy-rc.d is left as it is."""

    @contextlib.contextmanager
    def guard() -> Any:
        policy = Path("/usr/sbin/policy-rc.d")
        if policy.exists():
            yield
            return
        policy.write_text(
            "#!/bin/sh\n# cluster-engine failover drill: no service starts during install\nexit 101\n"
        )
        policy.chmod(0o755)
        try:
            yield
        finally:
            policy.unlink(missing_ok=True)

    return guard()


def ensure_installed() -> str:
    """Make ``patroni`` and ``etcd`` available; return what was done, for the report."""
    if shutil.which("patroni") and shutil.which("etcd"):
        return "none (patroni and etcd already installed)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(
            "the failover drill needs Patroni and etcd: install Debian's packages "
            f"({' '.join(PACKAGES)}) or put `patroni` and `etcd` on PATH "
            "(the drill installs them itself only when it runs as root on a machine with apt-get)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = [
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "-o",
        "Dpkg::Options::=--force-confold",
        *PACKAGES,
    ]
    with _policy_guard():
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:  # a clean machine may have no package lists yet
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(
            f"apt-get install {' '.join(PACKAGES)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    if Path("/run/systemd/system").exists() and shutil.which("systemctl"):
        # The packages enable etcd.service and patroni.service; the drill runs its own, on other ports.
        subprocess.run(
            ["systemctl", "disable", "--now", "etcd.service", "patroni.service"],
            capture_output=True,
            timeout=120,
        )
    if not (shutil.which("patroni") and shutil.which("etcd")):
        raise RuntimeError(f"installed {' '.join(PACKAGES)} but `patroni` or `etcd` is still not on PATH")
    return " ".join(PACKAGES)


# ----------------------------------------------------------------------------------------- processes


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _clean_env(home: Path) -> dict[str, str]:
    """Patroni and etcd are Debian's (system Python): none of this project's virtualenv may leak in."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }


def _as_user() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    return {"user": OS_USER, "group": OS_USER, "extra_groups": []}


def _own(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o700)
    return path


@dataclass
class Etcd:
    data_dir: Path
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        url_client, url_peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        log = (self.data_dir.parent / "etcd.log").open("ab")
        self.process = subprocess.Popen(
            [
                shutil.which("etcd") or "etcd",
                "--name=etcd1",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={url_client}",
                f"--advertise-client-urls={url_client}",
                f"--listen-peer-urls={url_peer}",
                f"--initial-advertise-peer-urls={url_peer}",
                f"--initial-cluster=etcd1={url_peer}",
                "--initial-cluster-state=new",
                f"--initial-cluster-token={SCOPE}-drill",
                "--listen-metrics-urls=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_clean_env(self.data_dir),
            start_new_session=True,
            **_as_user(),
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited: {(self.data_dir.parent / 'etcd.log').read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url_client}/health", timeout=1).json().get("health") == "true":
                    return
            time.sleep(0.1)
        raise TimeoutError("etcd not healthy after 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Node:
    """One Patroni member and the PostgreSQL it manages."""

    name: str
    home: Path
    pg_port: int
    api_port: int
    process: subprocess.Popen[bytes] | None = None
    killed_at: float | None = None
    data_dir: Path = field(init=False)  # PostgreSQL's, under ``home``
    config_path: Path = field(init=False)  # Patroni's
    api: str = field(init=False)  # Patroni's REST API

    def __post_init__(self) -> None:
        self.data_dir, self.config_path = self.home / "data", self.home / "patroni.yml"
        self.api = f"http://127.0.0.1:{self.api_port}"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/{database}"

    def write_config(self, etcd: Etcd, bindir: Path) -> None:
        """deploy/ha/patroni.yml with this node's name, addresses and directories filled in."""
        text = TEMPLATE.read_text()
        values = {
            "NODE_NAME": self.name,
            "NODE_ADDRESS": "127.0.0.1",
            "API_PORT": str(self.api_port),
            "PG_PORT": str(self.pg_port),
            "ETCD_HOSTS": etcd.endpoint,
            "DATA_DIR": str(self.data_dir),
            "PG_BIN_DIR": str(bindir),
            "PGPASS": str(self.home / "pgpass"),
            "SOCKET_DIR": str(self.home),
            "REPLICATION_PASSWORD": "drill-only-replication",
            "SUPERUSER_PASSWORD": "drill-only-superuser",
            "REWIND_PASSWORD": "drill-only-rewind",
        }
        for key, value in values.items():
            text = text.replace("${" + key + "}", value)
        config = yaml.safe_load(text)
        # The drill's network is loopback only; trust there spares it the passwords (production: scram).
        config["bootstrap"]["pg_hba"] = [
            "local all all trust",
            "host all all 127.0.0.1/32 trust",
            "host replication all 127.0.0.1/32 trust",
        ]
        config["log"] = {"level": "INFO", "dir": str(self.home), "file_num": 2}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        if os.geteuid() == 0:
            entry = pwd.getpwnam(OS_USER)
            os.chown(self.config_path, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        log = (self.home / "patroni.out").open("ab")
        self.process = subprocess.Popen(
            [shutil.which("patroni") or "patroni", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_clean_env(self.home),
            cwd=self.home,
            start_new_session=True,
            **_as_user(),
        )
        log.close()
        self.killed_at = None

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        return None

    def kill(self) -> None:
        """The machine dies: Patroni, the postmaster and every backend get SIGKILL at once."""
        pids: list[int] = []
        if self.process is not None and self.process.poll() is None:
            pids += [self.process.pid, *descendants(self.process.pid)]
        postmaster = self.postmaster_pid()
        if postmaster is not None and Path(f"/proc/{postmaster}").exists():
            pids += [postmaster, *descendants(postmaster)]
        _kill_all(pids)
        self.killed_at = time.monotonic()
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)

    def stop(self) -> None:
        """Patroni shuts its PostgreSQL down on SIGTERM; anything still alive afterwards is killed."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        self.kill()

    def cluster(self) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return httpx.get(f"{self.api}/cluster", timeout=1).json()
        return None

    def log_tail(self) -> str:
        parts = []
        for path in (self.home / "patroni.out", self.home / "patroni.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def roles(node: Node) -> dict[str, str]:
    """Member name -> role ("leader", "sync_standby", "replica"), as the node's Patroni sees the cluster."""
    cluster = node.cluster() or {}
    return {m.get("name", "?"): m.get("role", "?") for m in cluster.get("members", [])}


def wait_for(condition: Any, timeout: float, what: str, nodes: list[Node], interval: float = 0.1) -> float:
    """Poll ``condition()`` until true; return the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(interval)
    logs = "\n".join(node.log_tail() for node in nodes)
    raise TimeoutError(f"{what} not within {timeout:.0f} s\n{logs}")


def pair_healthy(observer: Node, leader: str, standby: str) -> bool:
    """``leader`` leads and ``standby`` is its synchronous standby (and streaming)."""
    cluster = observer.cluster() or {}
    members = {m.get("name"): m for m in cluster.get("members", [])}
    lead, sync = members.get(leader, {}), members.get(standby, {})
    return (
        lead.get("role") == "leader"
        and lead.get("state") == "running"
        and sync.get("role") == "sync_standby"
        and sync.get("state") in ("running", "streaming")
    )


# --------------------------------------------------------------------------------------------- drill


@dataclass
class Failover:
    label: str
    killed: str
    at: float  # seconds since the load began
    leader_after: float | None = None  # seconds from the kill until the survivor reported itself leader
    figures: dict[str, Any] = field(default_factory=dict)


def multi_host_url(nodes: list[Node]) -> str:
    """The service's CE_DATABASE_URL: every node, libpq picks the one that accepts writes.

    SQLAlchemy's spelling of a multi-host URL (``?host=h1:p1&host=h2:p2``); libpq's own
    ``postgresql://h1:p1,h2:p2/db`` is not accepted by the service's URL parsing (see deploy/ha/README.md).
    """
    hosts = "&".join(f"host=127.0.0.1:{node.pg_port}" for node in nodes)
    return f"postgresql://postgres@/{DATABASE}?{hosts}&target_session_attrs=read-write&connect_timeout=2"


def kill_and_wait(victim: Node, survivor: Node, load_start: float, nodes: list[Node], label: str) -> Failover:
    victim.kill()
    assert victim.killed_at is not None
    failover = Failover(label=label, killed=victim.name, at=victim.killed_at - load_start)
    with contextlib.suppress(TimeoutError):
        became = wait_for(
            lambda: roles(survivor).get(survivor.name) == "leader", 60, "promotion", nodes, 0.05
        )
        failover.leader_after = round(became - victim.killed_at, 2)
    return failover


def run(workdir: Path, *, short: bool) -> Report:
    report = Report()
    report.figures["packages installed by the drill"] = ensure_installed()
    bindir = find_bindir()
    steady = 12.0 if short else 30.0  # load before the (first) kill
    after = 25.0 if short else 40.0  # load after each kill
    rejoin_after = 12.0  # full: the dead node's machine comes back this long after the first kill

    workdir.chmod(0o755)  # the postgres user must reach its directories below
    base = _own(workdir / "ha")
    base.chmod(0o755)
    etcd = Etcd(_own(base / "etcd"), free_port(), free_port())
    nodes = [Node(f"pg{i}", _own(base / f"pg{i}"), free_port(), free_port()) for i in (1, 2)]
    servers: list[LiveServer] = []
    try:
        began = time.monotonic()
        etcd.start()
        for node in nodes:
            node.write_config(etcd, bindir)
        nodes[0].start()  # the first member bootstraps the cluster (initdb) and leads
        wait_for(lambda: roles(nodes[0]).get("pg1") == "leader", 60, "pg1 bootstrap", nodes)
        nodes[1].start()  # the second clones it (pg_basebackup) and becomes the synchronous standby
        wait_for(lambda: pair_healthy(nodes[0], "pg1", "pg2"), 90, "pg2 as synchronous standby", nodes)
        with psycopg.connect(nodes[0].url("postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        report.figures["cluster start (s)"] = round(time.monotonic() - began, 1)

        url = multi_host_url(nodes)
        env = {**os.environ, "CE_DATABASE_URL": url, "CE_DATA_DIR": str(workdir / "cli")}
        subprocess.run(
            [sys.executable, "-m", "cluster_engine", "db", "upgrade"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        secret = "failover-drill-" + os.urandom(24).hex()
        for i in (1, 2):
            servers.append(
                LiveServer.start(
                    workdir / f"api{i}",
                    database_url=url,
                    env={"CE_JWT_SECRET": secret},
                    args=["--workers", "1"],
                    timeout=60,
                )
            )
        catalog = seed_catalog(workdir / "catalog.json", orgs=ORGS)
        servers[0].cli("catalog", "import", str(catalog))
        for server in servers:
            server.wait_synced(timeout=15)

        load = Load(
            targets=[s.url for s in servers],
            secret=secret,
            orgs=ORGS,
            concurrency=16,
            rate=120.0,
            write_share=0.15,
            timeout=10.0,
        )
        total = steady + after + (0 if short else after + 5)
        thread = threading.Thread(target=load.run, args=(total,), name="failover-load", daemon=True)
        thread.start()
        wait_for(lambda: hasattr(load, "_start"), 10, "load start", nodes, 0.01)
        load_start: float = load._start  # the load's own clock, as Outcome.started
        failovers: list[Failover] = []

        time.sleep(max(0.0, load_start + steady - time.monotonic()))
        first = kill_and_wait(nodes[0], nodes[1], load_start, nodes, "failover")
        failovers.append(first)
        primary = nodes[1]
        if not short:
            # The dead machine comes back: Patroni rewinds it and it rejoins as the synchronous standby;
            # once it is, the new primary dies too and the cluster fails back.
            time.sleep(max(0.0, load_start + first.at + rejoin_after - time.monotonic()))
            nodes[0].start()
            rejoin = time.monotonic()
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: pair_healthy(nodes[1], "pg2", "pg1"), 60, "pg1 rejoining", nodes)
                report.figures["failback: pg1 restart → synchronous standby (s)"] = round(
                    time.monotonic() - rejoin, 1
                )
            time.sleep(max(0.0, load_start + first.at + after - time.monotonic()))
            if pair_healthy(nodes[1], "pg2", "pg1"):
                failovers.append(kill_and_wait(nodes[1], nodes[0], load_start, nodes, "failback"))
                primary = nodes[0]
            else:
                report.failures.append("failback: pg1 never rejoined as synchronous standby; no second kill")
        thread.join()

        outcomes = load.outcomes
        report.figures.update(summarize(outcomes))
        report.figures["503 answers"] = sum(1 for o in outcomes if o.status == 503)
        report.figures["answers outside contract"] = sum(1 for o in outcomes if o.problem)
        check_answers(outcomes, report)
        before = [o for o in outcomes if o.started + o.latency < failovers[0].at]  # answered before the kill
        report.figures["answers before the kill that were not 2xx"] = sum(
            1 for o in before if not 200 <= o.status < 300
        )
        report.check(
            all(200 <= o.status < 300 for o in before), "answers other than 2xx while the pair was healthy"
        )
        for i, failover in enumerate(failovers):
            # By answer time: a request in flight when the next kill came belongs to that next failover.
            end = failovers[i + 1].at if i + 1 < len(failovers) else float("inf")
            window = [o for o in outcomes if failover.at <= o.started + o.latency < end]
            _figures(report, failover, window)
        report.figures["cluster after the drill"] = roles(primary)
        verify_ledger(primary.url(), load.ledger, report, label=f"new primary {primary.name}")
        report.details += _details(failovers)
    finally:
        for server in servers:
            server.stop()
        for node in nodes:
            node.stop()
        etcd.stop()
    return report


def _figures(report: Report, failover: Failover, window: list[Outcome]) -> None:
    p = failover.label
    writes = recovery_after(window, failover.at, kind="create")
    reads = recovery_after(window, failover.at, kind="list")
    failover.figures = {"leader": failover.leader_after, "writes": writes, "reads": reads}
    report.figures[f"{p}: killed"] = f"{failover.killed} at {failover.at:.1f} s"
    report.figures[f"{p}: kill → Patroni reports the new leader (s)"] = failover.leader_after
    report.figures[f"{p}: kill → writes succeed again (s)"] = writes
    report.figures[f"{p}: kill → reads succeed again (s)"] = reads
    report.figures[f"{p}: 503 answers"] = sum(1 for o in window if o.status == 503)
    report.figures[f"{p}: longest response (ms)"] = round(
        max((o.latency for o in window), default=0) * 1000, 1
    )
    report.check(failover.leader_after is not None, f"{p}: Patroni did not promote the survivor within 60 s")
    report.check(writes is not None, f"{p}: writes never succeeded again after the kill")
    report.check(reads is not None, f"{p}: reads never succeeded again after the kill")
    if writes is not None and failover.leader_after is not None:
        # The service reconnects on the next request after promotion; allow the poll/pool timeouts.
        report.check(
            writes <= failover.leader_after + 5,
            f"{p}: writes took {writes} s to recover, {failover.leader_after} s after Patroni promoted",
        )


def _details(failovers: list[Failover]) -> list[str]:
    dcs = yaml.safe_load(TEMPLATE.read_text())["bootstrap"]["dcs"]
    lines = [
        f"Two Patroni nodes (`synchronous_mode: true`, ttl {dcs['ttl']} s, loop_wait {dcs['loop_wait']} s, "
        f"retry_timeout {dcs['retry_timeout']} s) with one etcd member, all on loopback; two service "
        "replicas (1 worker each) with the multi-host URL and `target_session_attrs=read-write`; paced mixed "
        "load (120 requests/s, 15% writes) over both replicas. The topology is deploy/ha/."
    ]
    for failover in failovers:
        f = failover.figures
        lines.append(
            f"- {failover.label}: {failover.killed} (primary) killed with SIGKILL (Patroni, postmaster, "
            f"backends); Patroni promoted the synchronous standby after {f['leader']} s (the leader key's "
            "ttl running out), "
            f"writes succeeded again {f['writes']} s after the kill, reads {f['reads']} s."
        )
    return lines
