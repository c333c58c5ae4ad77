"""The soak's reads from ``wrk`` with drills/soak.lua: the plan of requests (many orgs' tokens, varied
filters, conditional lists, gets by id), a check of the plan's answers, and a wrk run, closed loop or
paced, with its counts parsed: answers by kind and status, and per window the requests sent
and a latency histogram.

wrk is the generator because the Python one caps at a few hundred requests/s (most of a core) where the
service answers thousands per worker. Writes stay in Python (``common.Load``), which keeps the ledger.
"""

from __future__ import annotations

import math
import re
import resource
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench.wrk import WrkResult, parse_wrk

from cluster_engine.server.auth import mint_token

from .common import IDCS, PRODUCTS, image_entry, org

LUA_SCRIPT = Path(__file__).with_name("soak.lua")
KINDS = {"l": "list", "c": "conditional list", "g": "get by id"}
# Shares of the reads, in twentieths: a pattern of 20 requests (see ``pattern``).
MIX = {"l": 13, "c": 5, "g": 2}
OK = {"l": {200}, "c": {200, 304}, "g": {200}}  # anything else is an error
READER_ORGS = 40  # the catalog's 20 orgs with Customized images, and 20 that have none
BUCKETS_PER_E = 20  # as in soak.lua


def pattern(mix: dict[str, int] = MIX) -> str:
    """The kinds in the order request() takes them: each kind spread evenly (smooth weighted round robin)."""
    credit = dict.fromkeys(mix, 0)
    out = []
    for _ in range(sum(mix.values())):
        for kind, weight in mix.items():
            credit[kind] += weight
        kind = max(credit, key=lambda k: credit[k])
        credit[kind] -= sum(mix.values())
        out.append(kind)
    return "".join(out)


def mix_text(mix: dict[str, int] = MIX) -> str:
    total = sum(mix.values())
    return ", ".join(f"{KINDS[k]} {weight / total:.0%}" for k, weight in mix.items())


# -------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Line:
    kind: str
    org: int  # index of the org (drills.common.org)
    target: str


def _list_targets() -> list[str]:
    targets = ["/v1/images", "/v1/images?limit=25", "/v1/images?idc=us-west-1&limit=10"]
    targets += [f"/v1/images?idc={idc}" for idc in IDCS]
    targets += [f"/v1/images?product={product}" for product in PRODUCTS]
    targets += [f"/v1/images?idc={idc}&product={product}" for idc in IDCS for product in PRODUCTS]
    return targets


CONDITIONAL_TARGETS = (
    "/v1/images",
    "/v1/images?idc=us-west-1",
    "/v1/images?product=gpu.h100.8x",
    "/v1/images?idc=eu-central-1&product=gpu.b200.8x",
)


def plan(orgs: int, public: int, per_org: int) -> list[Line]:
    """Every line of the plan, orgs varying fastest within each kind. Lists and conditional lists for
    ``READER_ORGS`` orgs; gets of images each org may see: its own ``per_org`` seeded ones (or as many
    Public ones when it owns none) and 5 Public ones. The writer never deletes seeded images, so every
    get is a 200."""
    lines = [Line("l", o, t) for t in _list_targets() for o in range(READER_ORGS)]
    lines += [Line("c", o, t) for t in CONDITIONAL_TARGETS for o in range(READER_ORGS)]
    for k in range(per_org + 5):
        for o in range(READER_ORGS):
            if k < per_org and o < orgs:
                index = public + o * per_org + k
                entry = image_entry(index, owner=org(o))
            else:
                entry = image_entry((o * 7 + k) % public, owner=None)
            lines.append(Line("g", o, f"/v1/images/{entry['id']}"))
    return lines


def write_plan(path: Path, lines: Sequence[Line], secret: str, ttl: float) -> Path:
    tokens = {o: mint_token(secret, org(o), ttl=ttl) for o in {line.org for line in lines}}
    path.write_text("".join(f"{line.kind}\t{tokens[line.org]}\t{line.target}\n" for line in lines))
    return path


def check_plan(base: str, lines: Sequence[Line], secret: str, every: int = 25) -> list[str]:
    """Every ``every``-th line asked once: the status its kind expects, and a body that says what it
    should (a list of images the org may see, matching the filters; the image asked for). The problems."""
    problems = []
    with httpx.Client(base_url=base, timeout=10.0) as client:
        for line in lines[::every]:
            caller = org(line.org)
            token = mint_token(secret, caller, ttl=600)
            response = client.get(line.target, headers={"Authorization": f"Bearer {token}"})
            problem = _line_problem(line, caller, response)
            if problem:
                problems.append(f"{KINDS[line.kind]} {line.target} (org {line.org}): {problem}")
    return problems


def _line_problem(line: Line, caller: uuid.UUID, response: httpx.Response) -> str | None:
    if response.status_code != 200:
        return f"{response.status_code} {response.text[:200]}"
    if not response.headers.get("etag"):
        return "no ETag"
    body = response.json()
    if line.kind == "g":
        return None if body.get("id") == line.target.rsplit("/", 1)[1] else "another image"
    params = dict(httpx.URL(line.target).params)
    wrong = [
        i
        for i in body
        if (i["type"] == "Customized" and i["orgId"] != str(caller))
        or ("idc" in params and i["idc"] != params["idc"])
        or ("product" in params and params["product"] not in i["supportedProducts"])
    ]
    return f"{len(wrong)} images it should not hold" if wrong else None


# --------------------------------------------------------------------------------------------- run


@dataclass
class WrkRun:
    """What one wrk run with soak.lua counted."""

    # wrk's own summary: requests, rate, socket errors, latency. Its percentiles are "corrected" for
    # coordinated omission (stats_correct: an answer slower than twice runtime / (answers per connection)
    # adds synthetic samples below it, as for a closed loop that should have sent meanwhile); paced, where
    # free connections take the slots a slow one misses, that overstates them. Its max is measured.
    result: WrkResult
    seconds: float  # wall-clock length of the run
    cpu_seconds: float  # wrk's CPU time (user + system)
    sent: dict[int, int]  # window -> requests sent
    answers: dict[int, Counter[str]]  # window -> "kind status" -> answers
    histogram: dict[int, Counter[int]]  # window -> latency bucket -> answers
    unmatched: int  # answers without our request id

    def by_status(self, windows: set[int] | None = None) -> Counter[str]:
        total: Counter[str] = Counter()
        for window, counts in self.answers.items():
            if windows is None or window in windows:
                total.update(counts)
        return total

    def errors(self, windows: set[int] | None = None) -> Counter[str]:
        """Answers outside OK, by "kind status"; answers that could not be matched to a request count too."""
        bad = Counter({key: n for key, n in self.by_status(windows).items() if not _ok(key)})
        if windows is None and self.unmatched:
            bad["unmatched"] = self.unmatched
        return bad

    @property
    def unanswered(self) -> int:
        """Requests sent without an answer counted: at most one per connection (in flight at the end)."""
        return sum(self.sent.values()) - sum(self.by_status().values()) - self.unmatched

    def by_kind(self) -> Counter[str]:
        kinds: Counter[str] = Counter()
        for key, n in self.by_status().items():
            kinds[key.split()[0]] += n
        return kinds

    def latency_ms(self, q: float, window: int | None = None) -> float:
        """The ``q`` quantile of the answers (to requests sent in ``window``, or all): the middle of its
        bucket, ±2.5%. Every answer measured once, unlike wrk's percentiles (see ``WrkRun.result``)."""
        buckets: Counter[int] = Counter()
        for counted in self.histogram.values() if window is None else [self.histogram.get(window, Counter())]:
            buckets.update(counted)
        total = sum(buckets.values())
        if not total:
            return math.nan
        rank, seen = q * total, 0
        for bucket in sorted(buckets):
            seen += buckets[bucket]
            if seen > rank:
                return math.exp((bucket + 0.5) / BUCKETS_PER_E) / 1000
        return math.nan


def _ok(key: str) -> bool:
    kind, _, status = key.partition(" ")
    return kind in OK and status.isdigit() and int(status) in OK[kind]


def wrk_path() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk; .ci/run installs it)")
    return wrk


@dataclass
class Wrk:
    """A wrk process running soak.lua: ``start`` it, do other things, then ``finish`` for the counts."""

    base: str
    plan_file: Path
    duration: int
    t0: float  # epoch seconds: windows count from here
    width: float
    rate: float = 0.0  # requests/s; 0: closed loop
    connections: int = 64
    _process: subprocess.Popen[str] | None = field(default=None, init=False)
    _began: float = field(default=0.0, init=False)
    _cpu: float = field(default=0.0, init=False)

    def start(self) -> Wrk:
        argv = [
            wrk_path(),
            "-t1",
            f"-c{self.connections}",
            f"-d{self.duration}s",
            "--latency",
            "--timeout",
            "5s",
        ]
        argv += ["-s", str(LUA_SCRIPT), self.base + "/v1/images", "--", str(self.plan_file), pattern()]
        argv += [f"{self.t0:.6f}", f"{self.width:g}", f"{self.rate:.3f}"]
        self._cpu = _children_cpu()
        self._began = time.monotonic()
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def finish(self) -> WrkRun:
        assert self._process is not None
        try:
            out, err = self._process.communicate(timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            out, err = self._process.communicate()
            raise RuntimeError(f"wrk did not finish:\n{err[-2000:]}") from None
        seconds = time.monotonic() - self._began
        if self._process.returncode != 0 or "soak.lua" in err or "soak-lua unmatched" not in out:
            raise RuntimeError(f"wrk failed ({self._process.returncode}):\n{err[-2000:]}\n{out[-2000:]}")
        return parse_run(out, seconds, _children_cpu() - self._cpu)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_run(out: str, seconds: float, cpu_seconds: float) -> WrkRun:
    sent: Counter[int] = Counter()
    answers: dict[int, Counter[str]] = {}
    histogram: dict[int, Counter[int]] = {}
    for window, n in re.findall(r"^soak-lua sent (-?\d+) (\d+)$", out, re.M):
        sent[int(window)] += int(n)
    for window, kind, status, n in re.findall(r"^soak-lua answers (-?\d+) (\S+) (\d+) (\d+)$", out, re.M):
        answers.setdefault(int(window), Counter())[f"{kind} {status}"] += int(n)
    for window, bucket, n in re.findall(r"^soak-lua latency (-?\d+) (-?\d+) (\d+)$", out, re.M):
        histogram.setdefault(int(window), Counter())[int(bucket)] += int(n)
    unmatched = sum(int(n) for n in re.findall(r"^soak-lua unmatched (\d+)$", out, re.M))
    return WrkRun(parse_wrk(out), seconds, cpu_seconds, dict(sent), answers, histogram, unmatched)


def windows_of(run: WrkRun) -> Iterator[int]:
    yield from sorted(set(run.sent) | set(run.answers))
