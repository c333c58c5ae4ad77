#!/usr/bin/env python3
"""Benchmark the read path of cluster-engine with many tokens: every org of the catalog asking at once.

    .venv/bin/python bench/orgs.py [--sizes 100000] [--duration 10] [--rounds 2] [--connections 64]
                                   [--warmup 3] [--restart-duration 10] [--pairs 1] [--write-rate 10]
                                   [--scenarios single,spread,…] [--quick] [--store sqlite|postgresql]
                                   [--out FILE.md] [--keep] [--reuse KEPT_WORKDIR]

Per catalog size N: a deterministic catalog shaped like real traffic (the 800 Public images of
bench/run.py, then Customized images in orgs of 80, plus as many orgs without any), loaded with
``cluster-engine catalog import`` (timed, peak RSS), one token per org minted with PyJWT (the secret the
server is given), then for each scenario a fresh ``cluster-engine serve`` (one worker, pinned to the
first CPU) and ``wrk -t1`` (pinned to the second CPU) with bench/orgs.lua rotating the tokens. Scenarios:
``single`` (one org's token: the reference), ``spread`` (every org's token in turn), ``spread_hook``
(spread, counting statuses in a wrk ``response()`` hook: what the hook costs wrk), ``restart`` (spread
from the moment the server is ready, no warm-up, per-second throughput), ``spread_writes`` and
``single_writes`` (with a writer process creating and deleting Customized images at ~10/s). Only medians
over rounds are reported. See bench/README.md, "Many tokens".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt

from cluster_engine.testing.samples import image_body

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as core  # bench/run.py: catalog pieces, processes, wrk parsing, stores

LUA_SCRIPT = core.BENCH_DIR / "orgs.lua"
IMAGES_PER_ORG = 80
TOKEN_TTL = 12 * 3600
SEED = 20260202
SCENARIOS = {
    "single": "one org's token",
    "spread": "every org's token in turn",
    "spread_hook": "spread + wrk response() hook",
    "restart": "spread from readiness, no warm-up",
    "spread_writes": "spread + writer",
    "single_writes": "single + writer",
}
ALL_TOKENS = {"spread", "spread_hook", "restart", "spread_writes"}
WITH_WRITER = {"spread_writes", "single_writes"}
WRITER_MAX_LIVE = 200  # images the writer has created and not yet deleted, at most
SETTLED = 0.8  # restart: "settled" once a second's throughput reaches this share of warm spread
log = core.log


# ------------------------------------------------------------------------------------------ catalog


def customized_image(index: int) -> dict[str, Any]:
    """Customized image ``index``, of org ``index // 80``: the same whatever N is."""
    rng = random.Random(SEED * 1_000_003 + index)
    image, _ = core._image(
        rng,
        image_id=uuid.uuid5(core.NAMESPACE, f"orgs-customized-{index}"),
        kind="Customized",
        org=core.org_id(index // IMAGES_PER_ORG),
        idc=core.IDCS[rng.randrange(len(core.IDCS))],
        name=f"Custom-{index:07d}",
        created=core._stamp(core.CUSTOM_EPOCH + dt.timedelta(seconds=37 * index)),
    )
    return image


@dataclasses.dataclass(frozen=True)
class OrgsCatalog:
    n: int
    path: Path
    size_bytes: int
    orgs_with: list[uuid.UUID]  # orgs owning Customized images (80 each, the last one maybe fewer)
    orgs_without: list[uuid.UUID]  # as many orgs again, with no Customized image at all
    pairs: list[tuple[str, str]]  # the (idc, product) of the benchmark query, then the rotated ones
    public: dict[tuple[str, str], int]  # Public images per (idc, product)
    own: dict[uuid.UUID, Counter[tuple[str, str]]]  # Customized images per org and (idc, product)

    @property
    def org(self) -> uuid.UUID:
        """The ``single`` caller."""
        return self.orgs_with[0]

    @property
    def all_orgs(self) -> list[uuid.UUID]:
        return self.orgs_with + self.orgs_without

    def expected(self, org: uuid.UUID, pair: tuple[str, str]) -> int:
        own = self.own.get(org)
        return self.public.get(pair, 0) + (own[pair] if own else 0)

    @property
    def targets(self) -> list[str]:
        return [f"/v1/images?idc={idc}&product={product}" for idc, product in self.pairs]


def write_catalog(n: int, path: Path, pairs: int) -> OrgsCatalog:
    """The N-image catalog as JSON (same N → byte-identical file), and what each org should see."""
    if n <= core.N_PUBLIC:
        raise core.BenchError(f"catalog size {n} must exceed the {core.N_PUBLIC} fixed Public images")
    public: Counter[tuple[str, str]] = Counter()
    own: dict[uuid.UUID, Counter[tuple[str, str]]] = {}
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n")
        first = True
        for image in core.public_images():
            public.update((image["idc"], product) for product in image["supportedProducts"])
            out.write(("" if first else ",\n") + json.dumps(image, separators=(",", ":")))
            first = False
        for index in range(n - core.N_PUBLIC):
            image = customized_image(index)
            counter = own.setdefault(uuid.UUID(image["orgId"]), Counter())
            counter.update((image["idc"], product) for product in image["supportedProducts"])
            out.write(",\n" + json.dumps(image, separators=(",", ":")))
        out.write("\n]\n")
    with_images = math.ceil((n - core.N_PUBLIC) / IMAGES_PER_ORG)
    orgs_with = [core.org_id(i) for i in range(with_images)]
    orgs_without = [core.org_id(i) for i in range(with_images, 2 * with_images)]
    # The query, as in run.py: an (idc, product) where the single caller has Customized images too, with
    # a total as close to 30 as possible; then the next-closest pairs, for --pairs > 1.
    own0 = own[orgs_with[0]]
    everything = [(idc, product) for idc in core.IDCS for product in core.PRODUCTS]
    ranked = sorted(
        everything,
        key=lambda k: (
            own0[k] == 0,
            abs(public[k] + own0[k] - 30),
            core.IDCS.index(k[0]),
            core.PRODUCTS.index(k[1]),
        ),
    )
    return OrgsCatalog(
        n=n,
        path=path,
        size_bytes=path.stat().st_size,
        orgs_with=orgs_with,
        orgs_without=orgs_without,
        pairs=ranked[:pairs],
        public=dict(public),
        own=own,
    )


# ------------------------------------------------------------------------------------------- tokens


def mint(org: uuid.UUID, scopes: Sequence[str] = (), ttl: int = TOKEN_TTL) -> str:
    """An HS256 token with the claims ``cluster-engine token`` puts in (orgId, iat, exp, scope)."""
    now = int(time.time())
    claims: dict[str, Any] = {"orgId": str(org), "iat": now, "exp": now + ttl}
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode(claims, core.JWT_SECRET, algorithm="HS256")


def write_tokens(path: Path, tokens: Sequence[str]) -> Path:
    path.write_text("".join(token + "\n" for token in tokens), encoding="ascii")
    return path


# ---------------------------------------------------------------------------------------------- wrk


@dataclasses.dataclass
class LuaRun:
    result: core.WrkResult
    non2xx: int  # wrk's "Non-2xx or 3xx responses" (in fact: status ≥ 400)
    socket_errors: int
    max_ms: float
    hook_non200: int | None  # counted by the response() hook, None without it
    statuses: dict[int, int]  # status ≠ 200 → count (hook only)
    buckets: dict[int, int]  # second since T0 → requests sent (≈ answers: one at a time per connection)
    clock: str
    started: float  # wall-clock time wrk was started
    ended: float
    wrk_cpu_s: float = 0.0  # CPU time wrk used (user + system)
    worker_cpu_s: float | None = None  # CPU time the serving worker used during the run


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time so far (user + system), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_lua_wrk(
    cores: core.Cores,
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
    argv = [*cores.load, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]
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
    if result.returncode != 0 or "orgs.lua" in result.stderr:
        raise core.BenchError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    out = result.stdout
    parsed = core.parse_wrk(out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    buckets: Counter[int] = Counter()
    for bucket, sent in re.findall(r"^orgs-lua bucket (-?\d+) (\d+)$", out, re.M):
        buckets[int(bucket)] += int(sent)
    statuses: Counter[int] = Counter()
    for status, answers in re.findall(r"^orgs-lua status (\d+) (\d+)$", out, re.M):
        statuses[int(status)] += int(answers)
    clock = re.search(r"^orgs-lua clock (\S+)$", out, re.M)
    if not buckets or not latency:
        raise core.BenchError(f"bench/orgs.lua counted nothing, or no latency line:\n{out}")
    return LuaRun(
        result=parsed,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(v) for v in sockets.groups()) if sockets else 0,
        max_ms=core._ms(latency.group(1)),
        hook_non200=sum(statuses.values()) if status_hook else None,
        statuses=dict(statuses),
        buckets=dict(buckets),
        clock=clock.group(1) if clock else "",
        started=started,
        ended=ended,
        wrk_cpu_s=wrk_cpu,
        worker_cpu_s=None if worker_before is None or worker_after is None else worker_after - worker_before,
    )


# ------------------------------------------------------------------------------------------- writer


def create_body(rng: random.Random, org: uuid.UUID | str) -> dict[str, Any]:
    """A valid ``ImageCreateReq`` (plus ``type``) for a Customized image of ``org``, with a fresh name."""
    idc = rng.choice(core.IDCS)
    products = sorted(rng.sample(core.PRODUCTS, rng.randint(2, 4)), key=core.PRODUCTS.index)
    name = f"Written-{uuid.UUID(int=rng.getrandbits(128)).hex}"
    return image_body(org, name, type="Customized", idc=idc, supportedProducts=products)


def writer_main(config_path: str) -> int:
    """The writer process: paced creates and deletes of Customized images over random orgs until SIGTERM,
    then the deletion of whatever it created; every write's (start, end, op, status) goes to a JSON file.
    One write at a time, on a fixed schedule (``rate`` per second) that never bursts to catch up."""
    config = json.loads(Path(config_path).read_text())
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(config["seed"])
    orgs: list[str] = config["orgs"]
    tokens: dict[str, dict[str, str]] = {}
    live: list[tuple[str, str]] = []  # (image id, org)
    records: list[tuple[float, float, str, int]] = []

    def auth(org: str) -> dict[str, str]:
        if org not in tokens:
            tokens[org] = {"Authorization": f"Bearer {mint(uuid.UUID(org), ['images:write'])}"}
        return tokens[org]

    def delete(client: httpx.Client, image_id: str, org: str) -> int:
        return client.delete(f"/v1/images/{image_id}", headers=auth(org)).status_code

    with httpx.Client(base_url=config["base"], timeout=10.0) as client:
        interval = 1.0 / config["rate"]
        schedule, k = time.monotonic(), 0
        while not stop:
            delay = schedule + k * interval - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.1))
                continue
            if delay < -2 * interval:  # fell behind (slow answers): a new schedule rather than a burst
                schedule, k = time.monotonic(), 0
            k += 1
            create = not live or (len(live) < WRITER_MAX_LIVE and rng.random() < 0.5)
            started = time.time()
            try:
                if create:
                    org = rng.choice(orgs)
                    response = client.post("/v1/images", json=create_body(rng, org), headers=auth(org))
                    status = response.status_code
                    if status == 201:
                        live.append((response.json()["id"], org))
                else:
                    image_id, org = live.pop(rng.randrange(len(live)))
                    status = delete(client, image_id, org)
            except httpx.HTTPError:
                status = 0
            records.append((started, time.time(), "create" if create else "delete", status))
        left = 0
        for image_id, org in live:
            with contextlib.suppress(httpx.HTTPError):
                if delete(client, image_id, org) == 204:
                    continue
            left += 1
    Path(config["out"]).write_text(json.dumps({"records": records, "left": left}))
    return 0


@dataclasses.dataclass(frozen=True)
class WriteStats:
    rate: float  # writes finished per second over the measured wrk run
    writes: int
    failed: int  # status not 201/204 (0 = no answer)
    p50_ms: float
    p99_ms: float
    left: int  # images the writer could not delete at the end


class Writer:
    def __init__(
        self, cores: core.Cores, base: str, orgs: Sequence[uuid.UUID], rate: float, seed: int, workdir: Path
    ) -> None:
        self.out = workdir / "writer.json"
        config = workdir / "writer-config.json"
        config.write_text(
            json.dumps(
                {
                    "base": base,
                    "orgs": [str(o) for o in orgs],
                    "rate": rate,
                    "seed": seed,
                    "out": str(self.out),
                }
            )
        )
        self.process = core.Process(
            "writer",
            [*cores.load, core.PYTHON, str(Path(__file__).resolve()), "_writer", str(config)],
            dict(os.environ),
            workdir / "writer.log",
        )

    def finish(self, window: tuple[float, float]) -> WriteStats:
        """Stop the writer (it deletes what it created) and count its writes over ``window``."""
        with contextlib.suppress(ProcessLookupError):
            self.process.popen.send_signal(signal.SIGTERM)
        try:
            self.process.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.process.stop()
            raise core.BenchError(f"the writer did not finish:\n{self.process.log_tail()}") from None
        if self.process.popen.returncode != 0 or not self.out.exists():
            raise core.BenchError(
                f"the writer failed ({self.process.popen.returncode}):\n{self.process.log_tail()}"
            )
        data = json.loads(self.out.read_text())
        start, end = window
        inside = [r for r in data["records"] if start <= r[1] <= end]
        latencies = sorted((r[1] - r[0]) * 1000 for r in inside)
        return WriteStats(
            rate=len(inside) / (end - start),
            writes=len(inside),
            failed=sum(1 for r in inside if r[3] not in (201, 204)),
            p50_ms=_quantile(latencies, 0.5),
            p99_ms=_quantile(latencies, 0.99),
            left=int(data["left"]),
        )

    def stop(self) -> None:
        self.process.stop()


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))]


# ------------------------------------------------------------------------------------------- checks


def check(base: str, catalog: OrgsCatalog, cli_token: str) -> list[str]:
    """Real answers for a sample of orgs: each one's filtered list is Public + its own images, the PyJWT
    token and the CLI's give the same bytes, and one write of the writer's shape is accepted."""
    rng = random.Random(SEED)
    sample = [catalog.org, *rng.sample(catalog.orgs_with[1:], min(10, len(catalog.orgs_with) - 1))]
    sample += rng.sample(catalog.orgs_without, min(5, len(catalog.orgs_without)))
    notes: list[str] = []
    with httpx.Client(base_url=base, timeout=30.0) as client:
        for pair, target in zip(catalog.pairs, catalog.targets, strict=True):
            for org in sample:
                response = client.get(target, headers={"Authorization": f"Bearer {mint(org)}"})
                if response.status_code != 200:
                    raise core.BenchError(
                        f"org {org}: {target} → {response.status_code} {response.text[:300]}"
                    )
                data = response.json()
                if len(data) != catalog.expected(org, pair):
                    raise core.BenchError(
                        f"org {org}: {target} has {len(data)} images, expected {catalog.expected(org, pair)}"
                    )
                wrong = [
                    i
                    for i in data
                    if i["idc"] != pair[0]
                    or pair[1] not in i["supportedProducts"]
                    or (i["type"] == "Customized" and i["orgId"] != str(org))
                ]
                if wrong:
                    raise core.BenchError(f"org {org}: {target} holds {len(wrong)} images it should not")
                if org == catalog.org and target == catalog.targets[0]:
                    by_cli = client.get(target, headers={"Authorization": f"Bearer {cli_token}"})
                    if by_cli.content != response.content:
                        raise core.BenchError("the CLI's token and the PyJWT token get different answers")
                    own = sum(1 for i in data if i["type"] == "Customized")
                    notes.append(
                        f"`single` query `{target}`: {len(data)} images ({own} of the caller's own),"
                        f" {len(response.content):,} bytes; the CLI's and PyJWT's tokens get the same bytes"
                    )
        sizes = [catalog.expected(org, catalog.pairs[0]) for org in catalog.all_orgs]
        notes.append(
            f"`spread` answers for `{catalog.targets[0]}`: {min(sizes)} to {max(sizes)} images"
            f" (median {statistics.median(sizes):g}); checked for {len(sample)} orgs"
            f" ({len(sample) - min(5, len(catalog.orgs_without))} with Customized images)"
            + (f", on {len(catalog.pairs)} pairs" if len(catalog.pairs) > 1 else "")
        )
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        if "ImageCreateReq" not in schema:
            raise core.BenchError("the served OpenAPI document has no ImageCreateReq")
        org = catalog.orgs_without[0]
        writer_auth = {"Authorization": f"Bearer {mint(org, ['images:write'])}"}
        created = client.post("/v1/images", json=create_body(rng, org), headers=writer_auth)
        if created.status_code != 201:
            raise core.BenchError(f"the writer's create → {created.status_code} {created.text[:300]}")
        deleted = client.delete(f"/v1/images/{created.json()['id']}", headers=writer_auth)
        if deleted.status_code != 204:
            raise core.BenchError(f"the writer's delete → {deleted.status_code} {deleted.text[:300]}")
        notes.append("the writer's create (201) and delete (204) checked once")
    return notes


# -------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class Options:
    sizes: list[int]
    duration: int
    rounds: int
    connections: int
    warmup: int
    restart_duration: int
    pairs: int
    write_rate: float
    scenarios: list[str]
    quick: bool
    store: str
    out: Path | None
    keep: bool
    reuse: Path | None


@dataclasses.dataclass
class Measured:
    scenario: str
    round: int
    startup_s: float
    run: LuaRun
    rss_after_kib: int | None
    writes: WriteStats | None = None
    ready_at: float = 0.0  # restart: wall-clock time /readyz first answered 200 (as seen by the harness)


@dataclasses.dataclass
class SizeReport:
    n: int
    file_mb: float
    orgs_with: int
    orgs_without: int
    import_s: float
    import_rss_kib: int
    import_output: str
    startup_s: float
    rss_idle_kib: int | None
    notes: list[str]
    runs: list[Measured]

    def of(self, scenario: str) -> list[Measured]:
        return [m for m in self.runs if m.scenario == scenario]


@dataclasses.dataclass
class Context:
    opts: Options
    cores: core.Cores
    env: dict[str, str]
    catalog: OrgsCatalog
    single_tokens: Path
    all_tokens: Path
    sizedir: Path


def run_scenario(ctx: Context, scenario: str, round_index: int) -> Measured:
    opts, cores, catalog = ctx.opts, ctx.cores, ctx.catalog
    rundir = ctx.sizedir / f"{scenario}-{round_index + 1}"
    rundir.mkdir()
    tokens = ctx.all_tokens if scenario in ALL_TOKENS else ctx.single_tokens
    service, base, startup_s = core._start_service(ctx.env, cores, rundir, catalog.n)
    ready_at = time.time()
    children = core.descendants(service.pid)
    worker = max(children, key=lambda pid: core.rss_kib(pid) or 0) if children else None
    writer: Writer | None = None
    try:
        if scenario == "restart":
            run = run_lua_wrk(
                cores,
                base,
                tokens,
                catalog.targets,
                opts.connections,
                opts.restart_duration,
                ready_at,
                worker=worker,
            )
        else:
            if scenario in WITH_WRITER:
                seed = SEED + 1000 * round_index + list(SCENARIOS).index(scenario)
                writer = Writer(cores, base, catalog.all_orgs, opts.write_rate, seed, rundir)
            hook = scenario == "spread_hook"
            load = (cores, base, tokens, catalog.targets, opts.connections)
            run_lua_wrk(*load, opts.warmup, status_hook=hook)
            run = run_lua_wrk(*load, opts.duration, status_hook=hook, worker=worker)
        writes = writer.finish((run.started, run.ended)) if writer else None
        if not service.alive():
            raise core.BenchError(f"the service died during {scenario}:\n{service.log_tail()}")
        rss_after, _ = core._worker_rss(service)
        return Measured(scenario, round_index, startup_s, run, rss_after, writes, ready_at)
    finally:
        if writer is not None:
            writer.stop()
        service.stop()


def bench_size(n: int, opts: Options, cores: core.Cores, store: core.Store, workdir: Path) -> SizeReport:
    sizedir = workdir / f"n{n}"
    sizedir.mkdir()
    catalog_path = sizedir / "catalog.json"
    log(f"N={n}: generating {catalog_path}")
    catalog = write_catalog(n, catalog_path, opts.pairs)
    env = store.env_for(n)
    imported = None if opts.reuse is None else opts.reuse / f"data-{n}"
    if imported is not None:  # the database of an earlier run with --keep, copied (scenarios write)
        data_dir = Path(env["CE_DATA_DIR"])
        for name in ("cluster-engine.db", "cluster-engine.db-wal"):
            if (imported / name).exists():
                shutil.copyfile(imported / name, data_dir / name)
        output, import_s, import_rss = f"reused the import in {imported}", 0.0, 0
        log(f"N={n}: {output}")
    else:
        output, import_s, import_rss = core.import_catalog(n, store, env, catalog_path, sizedir)
    if not opts.keep:
        catalog_path.unlink()
    cli_token = core.run_checked(
        [core.CLUSTER_ENGINE, "token", "--org", str(catalog.org), "--ttl", "12h"], env, 60
    ).strip()
    orgs = catalog.all_orgs
    random.Random(SEED).shuffle(orgs)  # with and without Customized images, mixed
    all_tokens = write_tokens(sizedir / "tokens-all.txt", [mint(org) for org in orgs])
    single_tokens = write_tokens(sizedir / "tokens-single.txt", [cli_token])
    log(
        f"N={n}: {len(orgs):,} tokens ({len(catalog.orgs_with):,} orgs with Customized images,"
        f" {len(catalog.orgs_without):,} without)"
    )

    checkdir = sizedir / "check"
    checkdir.mkdir()
    service, base, startup_s = core._start_service(env, cores, checkdir, n)
    try:
        log(f"N={n}: service ready after {startup_s:.1f}s; checking answers")
        rss_idle, _ = core._worker_rss(service)
        notes = check(base, catalog, cli_token)
    finally:
        service.stop()

    ctx = Context(opts, cores, env, catalog, single_tokens, all_tokens, sizedir)
    runs: list[Measured] = []
    names = opts.scenarios
    for round_index in range(opts.rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        log(f"N={n}: round {round_index + 1}/{opts.rounds}: {', '.join(order)}")
        for scenario in order:
            measured = run_scenario(ctx, scenario, round_index)
            runs.append(measured)
            result = measured.run.result
            extra = ""
            if measured.writes:
                extra = f", {measured.writes.rate:.1f} writes/s ({measured.writes.failed} failed)"
            log(
                f"N={n}: {scenario}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.1f} ms,"
                f" {measured.run.non2xx + measured.run.socket_errors} errors{extra};"
                f" start-up {measured.startup_s:.1f}s, worker RSS {core._mib(measured.rss_after_kib)} MiB"
            )
    return SizeReport(
        n=n,
        file_mb=catalog.size_bytes / 1e6,
        orgs_with=len(catalog.orgs_with),
        orgs_without=len(catalog.orgs_without),
        import_s=import_s,
        import_rss_kib=import_rss,
        import_output=output.strip(),
        startup_s=startup_s,
        rss_idle_kib=rss_idle,
        notes=notes,
        runs=runs,
    )


# ----------------------------------------------------------------------------------------- report


def _med(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def _count(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:g}"


def _cpu_cells(runs: Sequence[Measured]) -> str:
    """The worker's CPU share during the run (and its CPU per answer), and wrk's: a worker below 100%
    while wrk is near it means the figure is wrk's limit, not the service's."""
    spans = [m.run.ended - m.run.started for m in runs]
    worker = _med(
        [
            m.run.worker_cpu_s / s if m.run.worker_cpu_s is not None else None
            for m, s in zip(runs, spans, strict=True)
        ]
    )
    per_request = _med(
        [
            m.run.worker_cpu_s * 1e6 / m.run.result.requests if m.run.worker_cpu_s is not None else None
            for m in runs
        ]
    )
    wrk = _med([m.run.wrk_cpu_s / s for m, s in zip(runs, spans, strict=True)])
    if math.isnan(worker):
        return f"? | {wrk * 100:.0f}"
    return f"{worker * 100:.0f} ({per_request:.0f}) | {wrk * 100:.0f}"


def per_second(m: Measured, seconds: int) -> list[int]:
    """Restart: the requests sent in each second after readiness."""
    return [m.run.buckets.get(s, 0) for s in range(seconds)]


def settled_after(m: Measured, seconds: int, threshold: float) -> int | None:
    """Restart: the end of the first second after readiness whose throughput reached ``threshold``."""
    for second, rate in enumerate(per_second(m, seconds)):
        if rate >= threshold:
            return second + 1
    return None


def warm_spread(report: SizeReport) -> float:
    return _med([m.run.result.rps for m in report.of("spread") or report.of("spread_hook")])


def render_report(
    reports: list[SizeReport], opts: Options, cores: core.Cores, versions: dict[str, str]
) -> str:
    lines = [
        "# cluster-engine read path with many tokens (bench/orgs.py)",
        "",
        f"- store: {opts.store}; rounds: {opts.rounds} (scenario order rotated);"
        f" wrk `-t1 -c{opts.connections}` with bench/orgs.lua, runs of {opts.duration}s after a"
        f" {opts.warmup}s warm-up of the same load, each scenario on a fresh server; medians over rounds",
        f"- {versions.get('source', 'src at ?')}; service configuration: {core._service_config()}",
        f"- {cores.description}; {versions.get('granian', '?')}, loop {versions.get('loop', '?')};"
        f" {versions.get('wrk', '?')}",
        f"- catalog: the {core.N_PUBLIC} Public images of bench/run.py, Customized images in orgs of"
        f" {IMAGES_PER_ORG}, as many orgs again without any; one HS256 token per org"
        " (PyJWT: orgId, iat, exp); `single` uses the `cluster-engine token` token of one org, through the"
        " same Lua script",
        "",
        "## Import and start-up",
        "",
        "| N | catalog file MB | orgs with / without Customized | import s | import peak RSS MiB"
        " | import result | serve start-up s | worker RSS MiB idle |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.n:,} | {r.file_mb:.1f} | {r.orgs_with:,} / {r.orgs_without:,} | {r.import_s:.1f} |"
            f" {core._mib(r.import_rss_kib)} | {r.import_output} | {r.startup_s:.1f} |"
            f" {core._mib(r.rss_idle_kib)} |"
        )
    for r in reports:
        single = _med([m.run.result.rps for m in r.of("single")])
        lines += ["", f"## N = {r.n:,}", ""]
        lines += [f"- {note}" for note in r.notes]
        lines += [
            "",
            "| scenario | tokens | req/s | ÷ single | p50 ms | p99 ms | non-2xx/3xx | socket errors"
            " | status ≠ 200 (hook) | writes/s (failed) | write p50 / p99 ms | start-up s"
            " | worker RSS MiB after | worker CPU % (µs/req) | wrk CPU % |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
        ]
        for key, title in SCENARIOS.items():
            runs = r.of(key)
            if not runs:
                continue
            rps = _med([m.run.result.rps for m in runs])
            writes = [m.writes for m in runs if m.writes]
            write_cells = "- | -"
            if writes:
                write_cells = (
                    f"{_med([w.rate for w in writes]):.1f} ({_count(_med([w.failed for w in writes]))}) |"
                    f" {core._fmt_ms(_med([w.p50_ms for w in writes]))} /"
                    f" {core._fmt_ms(_med([w.p99_ms for w in writes]))}"
                )
            hook = _med([m.run.hook_non200 for m in runs])
            rss = _med([m.rss_after_kib for m in runs])
            lines.append(
                f"| `{key}`: {title}"
                + (f" (first {opts.restart_duration}s)" if key == "restart" else "")
                + f" | {r.orgs_with + r.orgs_without if key in ALL_TOKENS else 1:,} |"
                f" {core._fmt_rps(rps)} | {core._fmt_ratio(core._div(rps, single))} |"
                f" {core._fmt_ms(_med([m.run.result.p50_ms for m in runs]))} |"
                f" {core._fmt_ms(_med([m.run.result.p99_ms for m in runs]))} |"
                f" {_count(_med([m.run.non2xx for m in runs]))} |"
                f" {_count(_med([m.run.socket_errors for m in runs]))} |"
                f" {_count(hook)} | {write_cells} | {_med([m.startup_s for m in runs]):.1f} |"
                f" {'?' if math.isnan(rss) else f'{rss / 1024:.0f}'} | {_cpu_cells(runs)} |"
            )
        if opts.rounds > 1:
            lines += [
                "",
                "Per round (the medians above are of these"
                + ("; with 2 rounds a median is their mean):" if opts.rounds == 2 else "):"),
                "",
                "| scenario | "
                + " | ".join(f"round {i + 1} req/s (p99 ms)" for i in range(opts.rounds))
                + " |",
                "|---|" + "---:|" * opts.rounds,
            ]
            for key in SCENARIOS:
                by_round = {m.round: m.run.result for m in r.of(key)}
                if by_round:
                    cells = [
                        f"{by_round[i].rps:,.0f} ({by_round[i].p99_ms:.1f})" if i in by_round else "-"
                        for i in range(opts.rounds)
                    ]
                    lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
        left = sum(m.writes.left for m in r.runs if m.writes)
        if left:
            lines += [
                "",
                f"The writer could not delete {left} of the images it created (they stay in the catalog).",
            ]
        statuses: Counter[int] = Counter()
        for m in r.runs:
            statuses.update(m.run.statuses)
        if statuses:
            lines += [
                "",
                "Statuses ≠ 200 seen by the hook (all rounds): "
                + ", ".join(f"{status}: {count:,}" for status, count in sorted(statuses.items())),
            ]
        spread, hooked = warm_spread(r), _med([m.run.result.rps for m in r.of("spread_hook")])
        if r.of("spread") and r.of("spread_hook"):
            lines += [
                "",
                "The response() hook's cost to wrk: `spread_hook` ÷ `spread` ="
                f" {core._fmt_ratio(core._div(hooked, spread))}"
                " (1.00 = no cost; every other scenario runs without it).",
            ]
        restarts = sorted(r.of("restart"), key=lambda m: m.round)
        if restarts:
            seconds = opts.restart_duration
            threshold = SETTLED * spread
            settled = [settled_after(m, seconds, threshold) for m in restarts]
            lines += [
                "",
                f"### N = {r.n:,}: `restart`, answers per second after readiness",
                "",
                "Spread load from the moment `/readyz` answered 200 (no warm-up): requests sent per second"
                " (wrk sends a connection's next request when its answer is complete, so this is the"
                " throughput, shifted by one latency); settled = the end of the first second at"
                f" ≥ {SETTLED:g} of warm `spread` ({core._fmt_rps(threshold)} req/s).",
                "",
                "| second after ready | " + " | ".join(f"round {m.round + 1} req/s" for m in restarts) + " |",
                "|---:|" + "---:|" * len(restarts),
            ]
            series = [per_second(m, seconds) for m in restarts]
            for second in range(seconds):
                cells = [f"{s[second]:,}" for s in series]
                lines.append(f"| {second} to {second + 1} | " + " | ".join(cells) + " |")
            described = [f"> {seconds} s" if s is None else f"{s} s" for s in settled]
            delays = [m.run.started - m.ready_at for m in restarts]
            lines += [
                "",
                f"- settled after: {', '.join(described)} (per round)",
                "- per round: non-2xx/3xx "
                + ", ".join(f"{m.run.non2xx:,}" for m in restarts)
                + "; socket errors "
                + ", ".join(f"{m.run.socket_errors:,}" for m in restarts)
                + "; slowest answer "
                + ", ".join(f"{m.run.max_ms:,.0f} ms" for m in restarts)
                + "; p99 "
                + ", ".join(f"{m.run.result.p99_ms:,.1f} ms" for m in restarts),
                f"- wrk launched {', '.join(f'{d * 1000:.0f} ms' for d in delays)} after readiness was seen"
                f" (polled every 0.1 s); timer {restarts[0].run.clock}",
            ]
    return "\n".join(lines) + "\n"


def _src_changes() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "-C", str(core.ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        files = sorted(line[3:] for line in out.splitlines() if line.strip())
        if files:
            digest = hashlib.sha256()
            for name in files:
                digest.update(name.encode() + b"\0")
                with contextlib.suppress(OSError):
                    digest.update((core.ROOT / name).read_bytes())
            return (
                " (uncommitted: "
                + ", ".join(f"`{f}`" for f in files)
                + f"; sha256 of their names and contents {digest.hexdigest()[:12]})"
            )
    return ""


# ------------------------------------------------------------------------------------------- main


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}; got {text!r}")
    return [name for name in SCENARIOS if name in names]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=core._int_list, default=[100_000], help="catalog sizes N (≥ 881)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; medians are reported")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of the same load before measuring")
    parser.add_argument("--restart-duration", type=int, default=10, help="seconds of the restart run")
    parser.add_argument("--pairs", type=int, default=1, help="(idc, product) pairs the spread rotates over")
    parser.add_argument("--write-rate", type=float, default=10.0, help="writer: writes per second")
    parser.add_argument("--scenarios", type=_names, default=list(SCENARIOS), help=", ".join(SCENARIOS))
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N=10000, 2 s runs, 1 round, 1 s warm-up"
    )
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown summary here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (catalogs, logs)")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="SQLite: copy each size's imported database from this work directory (kept by --keep) "
        "instead of importing again",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.duration, args.rounds, args.warmup, args.restart_duration = [10_000], 2, 1, 1, 3
    if min(args.duration, args.rounds, args.warmup, args.restart_duration, args.connections, args.pairs) < 1:
        parser.error("--duration, --rounds, --warmup, --restart-duration, --connections, --pairs must be ≥ 1")
    if not 0 < args.write_rate <= 1000:
        parser.error("--write-rate must be in (0, 1000]")
    if any(n <= core.N_PUBLIC + IMAGES_PER_ORG for n in args.sizes):
        parser.error(f"every size must exceed {core.N_PUBLIC + IMAGES_PER_ORG} (Public images + one org)")
    if args.reuse is not None:
        missing = [n for n in args.sizes if not (args.reuse / f"data-{n}" / "cluster-engine.db").is_file()]
        if args.store != "sqlite" or missing:
            parser.error(f"--reuse needs --store sqlite and a kept import of every size (missing: {missing})")
    if "single" not in args.scenarios:
        args.scenarios = ["single", *args.scenarios]  # the reference of every ratio
    return Options(
        sizes=args.sizes,
        duration=args.duration,
        rounds=args.rounds,
        connections=args.connections,
        warmup=args.warmup,
        restart_duration=args.restart_duration,
        pairs=args.pairs,
        write_rate=args.write_rate,
        scenarios=args.scenarios,
        quick=args.quick,
        store=args.store,
        out=args.out,
        keep=args.keep,
        reuse=args.reuse,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_writer"]:
        return writer_main(argv[1])
    opts = parse_args(argv)
    found_versions = core.versions()  # at the start: src/ may change while the benchmark runs
    found_versions["source"] = found_versions.get("source", "src at ?") + _src_changes()
    return core.run_sizes(
        "ce-bench-orgs-",
        opts,
        found_versions,
        lambda n, cores, store, workdir: bench_size(n, opts, cores, store, workdir),
        lambda reports, cores, found: render_report(reports, opts, cores, found),
    )


if __name__ == "__main__":
    sys.exit(main())
