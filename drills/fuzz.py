"""Fuzzing: schemathesis against the document a real server serves, and atheris (coverage-guided) on the
code that reads untrusted input; zero server errors, zero schema violations, zero crashes.

Schemathesis part: a server on loopback (SQLite, the demo catalog) is fuzzed through its own
``/openapi.json`` with the schemathesis CLI (in a subprocess: ``python -m drills.fuzz schemathesis …``,
which registers the adjusted checks and the id hook below, then runs ``st run``): every phase (examples,
coverage, fuzzing with ``--max-examples`` per operation, stateful link-following scenarios; the full
run then repeats stateful suites for a time budget, as one suite ends after a hundred-odd scenarios), both
generation modes (positive and negative), every check (``--checks all``), with an ``images:write
images:admin`` bearer token. The figures come from schemathesis's NDJSON and JSON reports and from the
server's access log; the server log must hold no traceback.

Deliberate adjustments (the first three as tests/test_schemathesis*.py make them):

* ``allow-extra-parameters = false``: the served document says unknown query parameters are ignored.
* ``cursor`` is opaque ("taken from a previous page's Link header"): ``positive_data_acceptance`` is
  replaced by a copy that accepts a 400 only about a ``cursor`` the server never issued.
* ``GET /v1/images/{id}`` answers 404 for an image of another org ("missing *or* not visible"): the
  admin token may create Customized images for any org, so ``ensure_resource_availability`` is replaced
  by a copy that skips a GET of an image created for another org than the token's (PATCH and DELETE,
  which admin may do on any org's image, are still checked).
* Link inference is off (the links are explicit; inferred ones read ``orgId`` as a reference).
* The fuzzing phase does not take ids from earlier responses (``extra-data-sources.responses = false``:
  with them, schemathesis ends DELETE's fuzzing after a dozen examples, when the few captured ids are
  used up); instead a hook swaps half of the generated image ids for ids of the demo catalog, so that
  GET, PATCH and DELETE reach real images. The stateful phase follows the links with the real ids.

Atheris part (``drills/fuzz_targets.py``): each target runs in its own process for a bounded time from
a seed corpus of valid inputs; an ``ApiError`` is an expected outcome, anything else a crash, whose input
is saved in the work directory (and each crash found became a test in tests/test_fuzz_regressions.py).
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cluster_engine.server import validation
from cluster_engine.testing import LiveServer

from .common import Report

NAME = "fuzz"
TITLE = "Fuzzing: schemathesis (all phases, stateful, all checks) and atheris on input parsing"

ROOT = Path(__file__).resolve().parent.parent
TOKEN_SCOPES = ["images:write", "images:admin"]
ATHERIS_TARGETS = ("query", "image_id", "bodies", "token")
SERVER_ERROR_TYPES = {"ServerError"}


@dataclass(frozen=True)
class Plan:
    examples: int  # schemathesis --max-examples: per operation, in the fuzzing phase
    scenarios: int  # max-examples of the stateful phase (hypothesis runs fewer, longer scenarios)
    stateful_seconds: int  # then a stateful-only run repeating suites for this long (0: none)
    steps: int  # most steps per stateful scenario
    schemathesis_timeout: float  # seconds before the schemathesis subprocess is killed
    atheris_seconds: int  # -max_total_time per atheris target


# examples, scenarios, stateful_seconds, steps, schemathesis_timeout, atheris_seconds
FULL = Plan(5000, 2500, 300, 12, 3600, 120)
SHORT = Plan(40, 40, 0, 6, 180, 6)
# One schemathesis worker: with more, hypothesis's lambda descriptions (ast.parse in threads) sometimes
# fail with "SystemError: AST constructor recursion depth mismatch" on Python 3.11.
SCHEMATHESIS_WORKERS = 1


# ------------------------------------------------------------------------------ schemathesis (child)


def _forged_cursor_rejected(case: Any, response: Any) -> bool:
    """Whether a 400 is only about ``cursor`` (opaque: a string the server never issued is refused)."""
    if response.status_code != 400 or not case.query or "cursor" not in case.query:
        return False
    try:
        details = response.json().get("validationDetail") or []
    except ValueError:
        return False
    return bool(details) and all(detail.get("field") == "cursor" for detail in details)


def _created_for_another_org(ctx: Any, case: Any, token_org: str) -> bool:
    """Whether this GET follows a create of a Customized image owned by another org than the token's."""
    parent = ctx.internals.find_parent(case_id=case.id)
    if parent is None or case.method.upper() != "GET":
        return False
    response = ctx.internals.find_response(case_id=parent.id)
    try:
        created = response.json() if response is not None else None
    except ValueError:
        return False
    return isinstance(created, dict) and created.get("type") != "Public" and created.get("orgId") != token_org


def _schemathesis_child(argv: list[str]) -> int:
    """``st ARGV`` with the adjusted checks registered (``--exclude-checks`` drops the originals)."""
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis.cli import schemathesis as cli
    from schemathesis.specs.openapi.checks import ensure_resource_availability, positive_data_acceptance

    from cluster_engine.cli.main import demo_catalog

    token_org = os.environ["CE_FUZZ_TOKEN_ORG"]
    known_ids = [entry["id"] for entry in demo_catalog()]

    @schemathesis.hook
    def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
        """Random UUIDs never name an image: half of the valid ids become ids of the demo catalog."""
        if path_parameters and validation.parse_uuid(str(path_parameters.get("id"))) is not None:
            known = st.sampled_from(known_ids).map(lambda image_id: {**path_parameters, "id": image_id})
            return st.just(path_parameters) | known
        return st.just(path_parameters)

    @schemathesis.check
    def positive_data_acceptance_but_opaque_cursor(ctx: Any, response: Any, case: Any) -> bool | None:
        if _forged_cursor_rejected(case, response):
            return None
        return positive_data_acceptance(ctx, response, case)

    @schemathesis.check
    def ensure_resource_availability_but_other_orgs(ctx: Any, response: Any, case: Any) -> bool | None:
        if _created_for_another_org(ctx, case, token_org):
            return None
        return ensure_resource_availability(ctx, response, case)

    try:
        cli.main(args=argv, prog_name="st", standalone_mode=True)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


# ----------------------------------------------------------------------------- schemathesis (drill)


CONFIG = """\
[generation]
allow-extra-parameters = false

[phases.fuzzing.extra-data-sources]
responses = false

[phases.stateful]
max-steps = {steps}

[phases.stateful.generation]
max-examples = {scenarios}

[phases.stateful.inference]
algorithms = []
"""


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
        "NO_COLOR": "1",
        **extra,
    }


def _read_ndjson(path: Path) -> dict[str, Any]:
    """Per operation: cases by phase and mode; stateful scenarios and steps; statuses seen."""
    cases: collections.Counter[tuple[str, str, str]] = collections.Counter()
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    scenarios = steps = 0
    with path.open() as lines:  # a full run's report is large: one event at a time
        for line in lines:
            if not line.startswith('{"ScenarioFinished"'):
                continue
            finished = json.loads(line)["ScenarioFinished"]
            recorder = finished.get("recorder") or {}
            recorded = recorder.get("cases") or {}
            for case_id, interaction in (recorder.get("interactions") or {}).items():
                value = (recorded.get(case_id) or {}).get("value") or {}
                if interaction.get("response"):
                    operation = f"{value.get('method', '?')} {value.get('path', '?')}"
                    statuses[(operation, interaction["response"]["status_code"])] += 1
            if finished["phase"] == "stateful":
                scenarios += bool(recorded)
                steps += len(recorded)
                continue
            for case in recorded.values():
                value = case["value"]
                mode = ((value.get("meta") or {}).get("generation") or {}).get("mode", "?")
                cases[(f"{value['method']} {value['path']}", finished["phase"], mode)] += 1
    return {"cases": cases, "statuses": statuses, "scenarios": scenarios, "steps": steps}


def _operations_with_inputs(document: dict[str, Any]) -> dict[str, bool]:
    """Each documented operation, and whether it takes parameters or a body (beyond the token)."""
    found: dict[str, bool] = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
                inputs = item.get("parameters") or operation.get("parameters") or operation.get("requestBody")
                found[f"{method.upper()} {path}"] = bool(inputs)
    return found


def _statuses(counts: collections.Counter[tuple[str, int]], documented: dict[str, bool]) -> dict[str, str]:
    """Per documented operation, and for undocumented methods together: "STATUS:COUNT …"."""
    merged: collections.Counter[tuple[str, int]] = collections.Counter()
    for (operation, status), count in counts.items():
        merged[(operation if operation in documented else "undocumented methods", status)] += count
    by_operation: dict[str, list[str]] = collections.defaultdict(list)
    for (operation, status), count in sorted(merged.items()):
        by_operation[operation].append(f"{status}:{count}")
    return {operation: " ".join(parts) for operation, parts in sorted(by_operation.items())}


def _read_access_log(text: str) -> tuple[collections.Counter[str], int, int]:
    """Requests per route, 5xx answers, and tracebacks in the server's log."""
    routes: collections.Counter[str] = collections.Counter()
    server_errors = 0
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "status" in entry and "method" in entry:
            routes[f"{entry['method']} {entry.get('route') or entry.get('path')}"] += 1
            server_errors += int(entry["status"]) >= 500
    return routes, server_errors, text.count("Traceback (most recent call last)")


@dataclass
class _Invocation:
    """One ``st run``: its exit code (None: killed at the timeout), JSON report, events and output."""

    name: str
    exit_code: int | None
    result: dict[str, Any] | None
    events: dict[str, Any]
    output: str
    seconds: float


def _st_run(workdir: Path, name: str, url: str, token: str, args: list[str], timeout: float) -> _Invocation:
    from cluster_engine.cli.main import DEMO_ORG

    ndjson, summary, log_path = (workdir / f"{name}.{ext}" for ext in ("ndjson", "json", "log"))
    command = [
        sys.executable, "-m", "drills.fuzz", "schemathesis",
        "--config-file", str(workdir / "schemathesis.toml"),
        "run", f"{url}/openapi.json",
        "--url", url,  # the document's first server is the contract's public one
        "--header", f"Authorization: Bearer {token}",
        "--mode", "all",
        "--checks", "all",
        "--exclude-checks", "positive_data_acceptance,ensure_resource_availability",
        "--continue-on-failure",
        "--suppress-health-check", "all",
        "--generation-database", "none",
        "--request-timeout", "10",
        "--report", "ndjson,json",
        "--report-ndjson-path", str(ndjson),
        "--report-json-path", str(summary),
        "--no-color",
        *args,
    ]  # fmt: skip
    began = time.monotonic()
    env = _child_env({"CE_FUZZ_TOKEN_ORG": str(DEMO_ORG)})
    exit_code, output = _run_logged(command, workdir, env, log_path, timeout)
    seconds = time.monotonic() - began
    result = json.loads(summary.read_text()) if summary.exists() else None
    events = _read_ndjson(ndjson) if ndjson.exists() else _read_ndjson_empty()
    return _Invocation(name, exit_code, result, events, output, seconds)


def _run_logged(
    command: list[str], workdir: Path, env: dict[str, str], log_path: Path, timeout: float
) -> tuple[int | None, str]:
    """Run a fuzzer child in ``workdir`` with its output to ``log_path``: its exit code (None when it
    ran past ``timeout`` and was killed) and what it wrote."""
    with log_path.open("wb") as log:
        streams: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT}
        child: subprocess.CompletedProcess[bytes] | None
        try:
            child = subprocess.run(command, cwd=workdir, env=env, timeout=timeout, check=False, **streams)
        except subprocess.TimeoutExpired:
            child = None
    return (child.returncode if child else None), log_path.read_text(errors="replace")


def _read_ndjson_empty() -> dict[str, Any]:
    return {"cases": collections.Counter(), "statuses": collections.Counter(), "scenarios": 0, "steps": 0}


def run_schemathesis(workdir: Path, plan: Plan, report: Report) -> None:
    from cluster_engine.cli.main import DEMO_ORG

    seed = random.randrange(2**31)
    report.figures["schemathesis seed"] = seed
    (workdir / "schemathesis.toml").write_text(CONFIG.format(steps=plan.steps, scenarios=plan.scenarios))
    server = LiveServer.start(workdir / "server", args=["--demo"])
    runs: list[_Invocation] = []
    try:
        ttl = 4 * (plan.schemathesis_timeout + plan.stateful_seconds) + 3600
        token = server.token(DEMO_ORG, scopes=TOKEN_SCOPES, ttl=ttl)
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        every_phase = ["--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(plan.examples)]
        common = ["--workers", str(SCHEMATHESIS_WORKERS), "--seed", str(seed)]
        runs.append(
            _st_run(
                workdir, "schemathesis", server.url, token, every_phase + common, plan.schemathesis_timeout
            )
        )
        if plan.stateful_seconds:
            # Hypothesis ends one stateful suite after a hundred-odd scenarios, however high max-examples is;
            # with a time budget, schemathesis starts suite after suite until the budget is spent.
            stateful = ["--phases", "stateful", "--max-time", str(plan.stateful_seconds)]
            timeout = plan.stateful_seconds + 300
            runs.append(
                _st_run(workdir, "schemathesis-stateful", server.url, token, stateful + common, timeout)
            )
    finally:
        server.stop()
    report.figures["schemathesis seconds"] = round(sum(run.seconds for run in runs), 1)
    routes, logged_5xx, tracebacks = _read_access_log(server.log())
    with_inputs = _operations_with_inputs(document)
    cases: collections.Counter[tuple[str, str, str]] = collections.Counter()
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    server_errors = violations = scenarios = steps = generated = 0
    for run in runs:
        if run.exit_code is None:
            report.failures.append(f"{run.name}: did not finish in time (see {workdir / run.name}.log)")
        if run.result is None:
            report.failures.append(
                f"{run.name}: wrote no report (exit {run.exit_code}):\n{run.output[-3000:]}"
            )
            continue
        cases.update(run.events["cases"])
        statuses.update(run.events["statuses"])
        scenarios += run.events["scenarios"]
        steps += run.events["steps"]
        generated += (run.result.get("test_cases") or {}).get("generated") or 0
        for failure in run.result.get("failures", []):
            failures[f"{failure['code']} {failure['title']}"] += failure["count"]
            if failure["type"] in SERVER_ERROR_TYPES:
                server_errors += failure["count"]
            else:
                violations += failure["count"]
        report.check(not run.result.get("errors"), f"{run.name}: errors {run.result.get('errors')}"[:2000])
        report.check(
            run.exit_code == 0 or bool(run.result.get("failures")), f"{run.name}: exit code {run.exit_code}"
        )
        if run.exit_code != 0:
            report.details.append(f"{run.name} output (tail):\n\n```\n{run.output[-4000:]}\n```")
    if not runs or runs[0].result is None:
        return
    operations = runs[0].result.get("operations") or {"tested": 0, "total": 0}
    per_operation: dict[str, int] = collections.defaultdict(int)
    fuzzed: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (operation, phase, mode), count in cases.items():
        if operation in with_inputs:  # not the undocumented methods of the coverage phase, nor probes
            per_operation[operation] += count
            if phase == "fuzzing":
                fuzzed[operation][mode] = count
    report.figures.update(
        {
            "operations": f"{operations['tested']}/{operations['total']}",
            "max examples per operation": plan.examples,
            "examples per operation (all phases but stateful)": dict(sorted(per_operation.items())),
            "fuzzing phase, positive/negative": {
                op: f"{modes.get('positive', 0)}/{modes.get('negative', 0)}"
                for op, modes in sorted(fuzzed.items())
            },
            "test cases generated": generated,
            "stateful scenarios": scenarios,
            "stateful steps": steps,
            "requests served": sum(routes.values()),
            "statuses": _statuses(statuses, with_inputs),
            "server errors": server_errors + logged_5xx,
            "schema violations": violations,
            "schemathesis failures": dict(failures) or "none",
            "server log tracebacks": tracebacks,
        }
    )
    report.check(not failures, f"schemathesis found failures: {dict(failures)}")
    report.check(
        operations["tested"] == operations["total"] and operations["total"] >= 7,
        f"schemathesis tested {operations['tested']} of {operations['total']} operations",
    )
    report.check(logged_5xx == 0, f"the server answered {logged_5xx} requests with 5xx")
    report.check(tracebacks == 0, f"the server log holds {tracebacks} tracebacks (see {server.log_path})")
    # Operations with inputs must really have been fuzzed (parameterless ones have one distinct request).
    thin = {
        op: sum(fuzzed.get(op, {}).values())
        for op, has_inputs in with_inputs.items()
        if has_inputs and sum(fuzzed.get(op, {}).values()) < plan.examples
    }
    report.check(not thin, f"operations that got fewer than {plan.examples} examples: {thin}")
    report.check(steps > 0, "the stateful phase ran no scenario")
    # the fuzzer got past validation: images were really listed, read, created, changed and deleted
    for operation, status in [
        ("GET /v1/images", 200),
        ("GET /v1/images/{id}", 200),
        ("POST /v1/images", 201),
        ("PATCH /v1/images/{id}", 200),
        ("DELETE /v1/images/{id}", 204),
    ]:
        report.check(statuses[(operation, status)] > 0, f"{operation} never answered {status}")


# ------------------------------------------------------------------------------------------ atheris


_DONE = re.compile(r"^#(\d+)\s+DONE\b", re.M)
_UNITS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_COVERAGE = re.compile(r"\bcov: (\d+) ft: (\d+)")


def run_atheris(workdir: Path, plan: Plan, report: Report) -> None:
    executions: dict[str, int] = {}
    coverage: dict[str, str] = {}
    crashes: dict[str, int] = {}
    crash_dir = workdir / "crashes"
    crash_dir.mkdir(parents=True, exist_ok=True)
    for target in ATHERIS_TARGETS:
        corpus = workdir / "corpus" / target
        base = [sys.executable, "-m", "drills.fuzz_targets", target]  # seeds the new corpus directory
        env = _child_env({"CE_FUZZ_CRASH_DIR": str(crash_dir), "CE_FUZZ_WORKDIR": str(workdir)})
        log_path = workdir / f"atheris-{target}.log"
        command = [
            *base,
            f"-max_total_time={plan.atheris_seconds}",
            "-rss_limit_mb=1536",
            "-timeout=20",  # seconds for one input
            "-max_len=16384",
            "-print_final_stats=1",
            f"-artifact_prefix={crash_dir}/{target}-",
            str(corpus),
        ]
        exit_code, output = _run_logged(command, workdir, env, log_path, plan.atheris_seconds + 120)
        units = _UNITS.search(output) or _DONE.search(output)
        executions[target] = int(units.group(1)) if units else 0
        covered = _COVERAGE.findall(output)
        coverage[target] = f"{covered[-1][0]}/{covered[-1][1]}" if covered else "?"
        found = sorted(crash_dir.glob(f"crash-{target}-*.bin")) + sorted(
            p for p in crash_dir.glob(f"{target}-*") if p.is_file()
        )
        crashes[target] = len(found)
        report.check(
            exit_code == 0, f"atheris {target}: exit {exit_code} (see {log_path}):\n{output[-2000:]}"
        )
        report.check(executions[target] > 0, f"atheris {target}: no executions counted")
        for path in found:
            described = path.with_suffix(".txt")
            what = described.read_text().splitlines()[0] if described.exists() else path.name
            report.failures.append(f"atheris {target}: crash {what}; reproducer {path}")
    report.figures.update(
        {
            "atheris seconds per target": plan.atheris_seconds,
            "atheris executions": executions,
            "atheris coverage (edges/features)": coverage,
            "atheris crashes": crashes,
        }
    )


# ------------------------------------------------------------------------------------------- drill


def run(workdir: Path, *, short: bool) -> Report:
    plan = SHORT if short else FULL
    report = Report()
    run_schemathesis(workdir, plan, report)
    run_atheris(workdir, plan, report)
    report.details.append(
        f"Schemathesis {_version('schemathesis')} against the served `/openapi.json` of a `--demo` server "
        f"(SQLite): phases examples, coverage, fuzzing (`--max-examples {plan.examples}`, positive and "
        f"negative) and stateful (scenarios of at most {plan.steps} steps following the document's links"
        + (f", then {plan.stateful_seconds} s more of stateful suites" if plan.stateful_seconds else "")
        + "), "
        "`--checks all` (adjusted as drills/fuzz.py says), an `images:write images:admin` token. "
        f"Atheris {_version('atheris')} on `list_query` (raw query strings and parameter mappings), "
        "`image_id`/`parse_uuid`, request bodies (`read_json` + `read_create_request`/`read_patch`/"
        "`read_catalog_entries`) and `Verifier.authenticate` (HS256; raw headers, and validly signed "
        f"tokens with fuzzed header and claims), {plan.atheris_seconds} s each from a seed corpus of valid "
        "inputs; any exception but the service's own `ApiError`s, or a broken invariant, is a crash."
    )
    return report


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:
        return "?"


if __name__ == "__main__":
    if sys.argv[1:2] == ["schemathesis"]:
        sys.exit(_schemathesis_child(sys.argv[2:]))
    sys.exit("usage: python -m drills.fuzz schemathesis ST-ARGS… (the drill itself: python -m drills fuzz)")
