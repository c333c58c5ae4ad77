"""``wrk`` as the load generator: its output parsed, a plain run with fixed headers (``bench run``), and a
run with bench/orgs.lua rotating many tokens, counting requests per second and statuses (``bench orgs``)."""

from __future__ import annotations

import dataclasses
import re
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .common import BENCH_DIR, BenchError
from .processes import Cores, cpu_seconds

LUA_SCRIPT = BENCH_DIR / "orgs.lua"
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclasses.dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    non2xx: int  # wrk's "Non-2xx or 3xx responses" (in fact: status ≥ 400)
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchError(f"unparseable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and latency and total):
        raise BenchError(f"could not parse wrk output:\n{output}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        max_ms=_ms(latency.group(1)),
        requests=int(total.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(value) for value in sockets.groups()) if sockets else 0,
    )


def _argv(cores: Cores, connections: int, duration: int) -> list[str]:
    return [*cores.load, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]


def _completed(result: subprocess.CompletedProcess[str], failed: bool = False) -> str:
    if result.returncode != 0 or failed:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return result.stdout


def run_wrk(cores: Cores, url: str, headers: dict[str, str], connections: int, duration: int) -> WrkResult:
    argv = _argv(cores, connections, duration)
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    return parse_wrk(_completed(subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)))


@dataclasses.dataclass
class LuaRun:
    result: WrkResult
    hook_non200: int | None  # counted by the response() hook, None without it
    statuses: dict[int, int]  # status ≠ 200 → count (hook only)
    buckets: dict[int, int]  # second since T0 → requests sent (≈ answers: one at a time per connection)
    clock: str
    started: float  # wall-clock time wrk was started
    ended: float
    wrk_cpu_s: float = 0.0  # CPU time wrk used (user + system)
    worker_cpu_s: float | None = None  # CPU time the serving worker used during the run


def run_lua_wrk(
    cores: Cores,
    base: str,
    tokens: Path,
    targets: Sequence[str],
    connections: int,
    duration: int,
    count_from: float | None = None,
    status_hook: bool = False,
    worker: int | None = None,
) -> LuaRun:
    """``wrk`` with bench/orgs.lua: requests counted per second since ``count_from`` (epoch seconds, default
    wrk's start), statuses ≠ 200 counted in a response() hook with ``status_hook``."""
    argv = _argv(cores, connections, duration)
    argv += ["-s", str(LUA_SCRIPT), base + targets[0], "--", str(tokens), ",".join(targets)]
    started = time.time()
    argv += [f"{started if count_from is None else count_from:.6f}", *(["status"] if status_hook else [])]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_before = cpu_seconds(worker) if worker else None
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    worker_after = cpu_seconds(worker) if worker else None
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    out = _completed(result, failed="orgs.lua" in result.stderr)
    buckets: Counter[int] = Counter()
    for bucket, sent in re.findall(r"^orgs-lua bucket (-?\d+) (\d+)$", out, re.M):
        buckets[int(bucket)] += int(sent)
    statuses: Counter[int] = Counter()
    for status, answers in re.findall(r"^orgs-lua status (\d+) (\d+)$", out, re.M):
        statuses[int(status)] += int(answers)
    clock = re.search(r"^orgs-lua clock (\S+)$", out, re.M)
    if not buckets:
        raise BenchError(f"bench/orgs.lua counted nothing:\n{out}")
    return LuaRun(
        result=parse_wrk(out),
        hook_non200=sum(statuses.values()) if status_hook else None,
        statuses=dict(statuses),
        buckets=dict(buckets),
        clock=clock.group(1) if clock else "",
        started=started,
        ended=ended,
        wrk_cpu_s=wrk_cpu,
        worker_cpu_s=None if worker_before is None or worker_after is None else worker_after - worker_before,
    )
