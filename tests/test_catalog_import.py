"""``cluster-engine catalog import`` end to end: the real command against a real database.

Tests that need the database and the HTTP view use the ``server`` fixture: the suite's shared server on
each store (``shared_server``), its catalog emptied before each test (``fresh_catalog``: the files here
use fixed ids and Public images, which every org sees); tests of files the command must refuse run the
command alone on a fresh SQLite file.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from cluster_engine.cli.main import main
from cluster_engine.testing import LiveServer, image_body
from cluster_engine.testing.stores import in_store

from .toolkit import fresh_catalog

ORG_A = uuid.UUID("0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01")
ORG_B = uuid.UUID("5d6c8a0e-9b1f-4e2a-8c3d-7f6e5d4c3b2a")
ID_1 = "a7e1b367-3db0-5a6a-aa1c-74c7b7cef6e9"
ID_2 = "7f89ab2e-2dae-5ef6-b6cc-59010392c286"
ID_3 = "c4a1e0a8-8a52-4a3c-9d0b-3c0e6f1b2d44"


def entry(name: str, **changes: Any) -> dict[str, Any]:
    """A valid catalog entry (Public by default in files, so ``type`` is left out unless given), for one
    product (gpu.h100.8x) so that a filter on another finds only the entries that name it."""
    return image_body(ORG_A, name, **{"supportedProducts": ["gpu.h100.8x"], **changes})


def write(directory: Path, entries: Any, suffix: str = ".yaml") -> Path:
    path = directory / f"catalog-{uuid.uuid4().hex[:8]}{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(entries))
    else:
        path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def run_import(server: LiveServer, entries: Any, *args: str) -> subprocess.CompletedProcess[str]:
    path = write(server.data_dir, entries)
    return server.cli("catalog", "import", str(path), *args, check=False)


def import_json(server: LiveServer, entries: Any, *args: str) -> dict[str, Any]:
    result = run_import(server, entries, "-o", "json", *args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    server.wait_synced()
    return report


def listed(server: LiveServer, org: uuid.UUID = ORG_A, **params: str) -> list[dict[str, Any]]:
    response = server.client(org).get("/v1/images", params=params)
    assert response.status_code == 200, f"{response.text}\n{server.log()[-3000:]}"
    body = response.json()
    assert isinstance(body, list)
    return body


def ready_revision(server: LiveServer) -> int:
    revision = httpx.get(f"{server.url}/readyz", timeout=5).json()["revision"]
    assert isinstance(revision, int)
    return revision


def by_name(images: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {image["name"]: image for image in images}


# ------------------------------------------------------------------------------- against a live server


@pytest.fixture
def server(shared_server: LiveServer) -> LiveServer:
    return fresh_catalog(shared_server)


def test_create_then_reimport_is_unchanged_and_takes_no_revision(server: LiveServer) -> None:
    entries = [
        entry("Ubuntu-22.04", id=ID_1, createdAt="2026-01-15T09:00:00Z"),
        entry("Rocky-9", id=ID_2, type="Public", createdAt="2026-01-14T09:00:00Z"),
        entry("Team-Image", type="Customized"),  # no id, no createdAt: both assigned
    ]
    before = ready_revision(server)
    first = import_json(server, entries)
    assert first == {
        "created": 3,
        "updated": 0,
        "unchanged": 0,
        "dryRun": False,
        "revision": first["revision"],
    }
    assert isinstance(first["revision"], int) and first["revision"] > before
    assert server.wait_synced() == first["revision"] == ready_revision(server)

    second = import_json(server, entries)
    assert second == {"created": 0, "updated": 0, "unchanged": 3, "dryRun": False, "revision": None}
    assert server.wait_synced() == first["revision"] == ready_revision(server)


def test_server_lists_what_was_imported(server: LiveServer) -> None:
    entries = [
        entry("Late", id=ID_1, createdAt="2026-02-01T00:00:00Z", supportedProducts=["gpu.b200.8x"]),
        entry("Early", id=ID_2, createdAt="2026-01-01T00:00:00+02:00"),
        entry("Mine", id=ID_3, type="Customized", createdAt="2026-01-15T00:00:00Z", idc="eu-1"),
        entry("Theirs", type="Customized", orgId=str(ORG_B), createdAt="2026-01-15T00:00:00Z"),
    ]
    assert import_json(server, entries)["created"] == 4
    mine = listed(server, ORG_A)
    assert [image["name"] for image in mine] == ["Early", "Mine", "Late"]
    assert [image["id"] for image in mine] == [ID_2, ID_3, ID_1]
    assert mine[0]["createdAt"].startswith("2025-12-31T22:00:00")  # kept as given, served in UTC
    assert all(image["type"] == "Public" for image in mine if image["name"] != "Mine")
    assert [image["name"] for image in listed(server, ORG_B)] == ["Early", "Theirs", "Late"]
    assert [image["name"] for image in listed(server, uuid.uuid4())] == ["Early", "Late"]
    assert [image["name"] for image in listed(server, ORG_A, idc="eu-1")] == ["Mine"]
    assert [image["name"] for image in listed(server, ORG_A, product="gpu.b200.8x")] == ["Late"]
    served = server.client(ORG_A).get(f"/v1/images/{ID_1}").json()
    wanted = {**entries[0], "type": "Public", "createdAt": "2026-02-01T00:00:00Z"}
    assert served == wanted


def test_json_files_are_imported(server: LiveServer) -> None:
    path = write(server.data_dir, [entry("From-Json", id=ID_1)], ".json")
    result = server.cli("catalog", "import", str(path), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "created 1, updated 0, unchanged 0"
    server.wait_synced()
    assert [image["id"] for image in listed(server)] == [ID_1]


def test_update_by_id(server: LiveServer) -> None:
    original = entry("Ubuntu-22.04", id=ID_1, createdAt="2026-01-15T09:00:00Z")
    import_json(server, [original])
    changed = {
        **original,
        "name": "Ubuntu-22.04-LTS",
        "idc": "us-east-2",
        "supportedProducts": ["gpu.b200.8x", "gpu.h100.8x"],
    }
    del changed["createdAt"]  # createdAt left out: the stored one is kept
    report = import_json(server, [changed])
    assert (report["created"], report["updated"], report["unchanged"]) == (0, 1, 0)
    (image,) = listed(server)
    assert image["id"] == ID_1 and image["name"] == "Ubuntu-22.04-LTS" and image["idc"] == "us-east-2"
    assert image["supportedProducts"] == ["gpu.b200.8x", "gpu.h100.8x"]
    assert image["createdAt"] == "2026-01-15T09:00:00Z"
    assert listed(server, product="gpu.b200.8x") == [image]
    assert listed(server, idc="us-west-1") == []

    # an id update can change the type (and so the owner namespace) and createdAt too
    report = import_json(server, [{**changed, "type": "Customized", "createdAt": "2020-01-01T00:00:00Z"}])
    assert report["updated"] == 1
    assert listed(server, ORG_B) == []
    (image,) = listed(server, ORG_A)
    assert (image["type"], image["createdAt"]) == ("Customized", "2020-01-01T00:00:00Z")


def test_update_by_identity(server: LiveServer) -> None:
    original = entry("Ubuntu-22.04")  # no id: identity is (idc, name, owner namespace)
    import_json(server, [original])
    (before,) = listed(server)
    report = import_json(server, [{**original, "path": "images/v2.qcow2", "BootMode": "Legacy"}])
    assert (report["created"], report["updated"], report["unchanged"]) == (0, 1, 0)
    (after,) = listed(server)
    assert after["id"] == before["id"] and after["createdAt"] == before["createdAt"]
    assert after["path"] == "images/v2.qcow2" and after["BootMode"] == "Legacy"

    # naming the image's id as well finds the same image (nothing to change); another name, idc or
    # owner is another identity: a new image
    same = {**original, "id": before["id"], "path": "images/v2.qcow2", "BootMode": "Legacy"}
    report = import_json(server, [same, {**original, "name": "Ubuntu-24.04"}])
    assert (report["created"], report["updated"], report["unchanged"]) == (1, 0, 1)
    assert sorted(image["name"] for image in listed(server)) == ["Ubuntu-22.04", "Ubuntu-24.04"]


def test_identity_includes_the_owner_namespace(server: LiveServer) -> None:
    same = [
        entry("Shared-Name"),
        entry("Shared-Name", type="Customized"),
        entry("Shared-Name", type="Customized", orgId=str(ORG_B)),
        entry("Shared-Name", idc="eu-1"),
    ]
    assert import_json(server, same)["created"] == 4
    assert import_json(server, same)["unchanged"] == 4
    assert len(listed(server, ORG_A)) == 3 and len(listed(server, ORG_B)) == 3
    # Public entries in a file are Public whichever orgId they carry: same identity, so an update
    report = import_json(server, [entry("Shared-Name", orgId=str(ORG_B))])
    assert (report["created"], report["updated"]) == (0, 1)


def test_dry_run_changes_nothing(server: LiveServer) -> None:
    entries = [entry("One", id=ID_1), entry("Two")]
    before = ready_revision(server)
    report = import_json(server, entries, "--dry-run")
    assert report == {"created": 2, "updated": 0, "unchanged": 0, "dryRun": True, "revision": None}
    assert listed(server) == [] and server.wait_synced() == before

    import_json(server, entries)
    current = listed(server)
    revision = server.wait_synced()
    changed = [{**entries[0], "path": "images/changed.qcow2"}, entries[1], entry("Three")]
    report = import_json(server, changed, "--dry-run")
    assert (report["created"], report["updated"], report["unchanged"]) == (1, 1, 1)
    assert listed(server) == current and server.wait_synced() == revision


def test_name_conflict_fails_and_imports_nothing(server: LiveServer) -> None:
    import_json(server, [entry("Taken", id=ID_1)])
    current = listed(server)
    revision = server.wait_synced()
    # a new id whose (namespace, idc, name) already belongs to another image
    result = run_import(server, [entry("Fresh", id=ID_2), entry("Taken", id=ID_3)])
    assert result.returncode != 0
    assert result.stdout == ""
    assert "already exists" in result.stderr and "name" in result.stderr
    assert "Traceback" not in result.stderr
    assert listed(server) == current and server.wait_synced() == revision


def test_prune_deletes_public_images_missing_from_the_file(server: LiveServer) -> None:
    import_json(
        server, [entry("Keep", id=ID_1), entry("Drop", id=ID_2), entry("Own", id=ID_3, type="Customized")]
    )
    report = import_json(server, [entry("Keep", id=ID_1)], "--prune", "--dry-run")
    assert (report["unchanged"], report["deleted"]) == (1, 1)
    assert len(listed(server)) == 3
    report = import_json(server, [entry("Keep", id=ID_1)], "--prune")
    assert (report["unchanged"], report["deleted"]) == (1, 1)
    assert sorted(image["name"] for image in listed(server)) == ["Keep", "Own"]  # Customized images stay
    assert server.client(ORG_A).get(f"/v1/images/{ID_2}").status_code == 404


def test_renames_that_swap_names_in_one_file(server: LiveServer) -> None:
    import_json(server, [entry("Alpha", id=ID_1), entry("Beta", id=ID_2)])
    result = run_import(server, [entry("Beta", id=ID_1), entry("Alpha", id=ID_2)])
    assert result.returncode == 0, result.stderr
    server.wait_synced()
    assert {image["id"]: image["name"] for image in listed(server)} == {ID_1: "Beta", ID_2: "Alpha"}


def test_dry_run_reports_a_name_conflict_like_the_real_import(server: LiveServer) -> None:
    import_json(server, [entry("Taken", id=ID_1)])
    # the real import of this file fails (test_name_conflict_fails_and_imports_nothing)
    assert run_import(server, [entry("Taken", id=ID_2)], "--dry-run").returncode != 0


# ------------------------------------------------------------------------------------ the command alone


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[..., Ran]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cluster-engine.db'}"


@pytest.fixture
def cli(tmp_path: Path, database_url: str) -> Runner:
    """The command run in this process (click's runner): the server tests above run it as a process."""
    runner = CliRunner()
    env = {"CE_DATA_DIR": str(tmp_path), "CE_DATABASE_URL": database_url}

    def run(*args: str) -> Ran:
        result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
        return Ran(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)

    return run


def image_count(url: str) -> int:
    return in_store(url, lambda store: store.count())


def test_invalid_file_reports_every_problem_one_line_each(
    cli: Runner, tmp_path: Path, database_url: str
) -> None:
    entries = [
        entry("Fine", id=ID_1),
        entry("bad\nname", idc="bad idc", icon=None),
        5,
        entry("Ok", DefaultPartitionTable=[{"name": "root", "mountPoint": "/", "size": ""}], type="public"),
        entry("Also-ok", id="not-a-uuid", createdAt="2026-01-15T09:00:00"),
    ]
    path = write(tmp_path, entries)
    result = cli("catalog", "import", str(path))
    assert result.returncode not in (0, None) and result.stdout == ""
    lines = result.stderr.splitlines()
    fields = [
        "[1].idc",
        "[1].name",
        "[1].icon",
        "[2]",
        "[3].DefaultPartitionTable[0].size",
        "[3].DefaultPartitionTable[0].fileSystem",
        "[3].type",
        "[4].id",
        "[4].createdAt",
    ]
    assert len(lines) == len(fields), result.stderr
    for line, field in zip(lines, fields, strict=True):
        assert line.startswith(f"{path}: {field}: "), line
    assert "'bad\\nname'" in lines[1]  # the offending value, escaped so it stays on its line
    assert image_count(database_url) == 0  # one bad entry: nothing imported, not even the good ones


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("", "catalog"),
        ("images: []\n", "catalog"),
        ("just a string\n", "catalog"),
        ('{"name": "x"}', "catalog"),
    ],
)
def test_a_file_that_is_not_a_list(cli: Runner, tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(content)
    result = cli("catalog", "import", str(path))
    assert result.returncode != 0 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{path}: {field}: ") and "list" in line


@pytest.mark.parametrize("content", [": [\n", "- a: [1, 2\n", '{"unterminated": \n', "- \t- x\n"])
def test_invalid_yaml(cli: Runner, tmp_path: Path, content: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(content)
    result = cli("catalog", "import", str(path))
    assert result.returncode != 0 and result.stdout == ""
    assert f"{path}: not valid YAML or JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file(cli: Runner, tmp_path: Path) -> None:
    result = cli("catalog", "import", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "nope.yaml" in result.stderr


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([entry("One", id=ID_1), entry("Two", id=ID_1)], ["[1].id: Same id as entry 0."]),
        ([entry("Same"), entry("Same", path="other")], ["[1].name: Same idc, name and owner as entry 0."]),
        (
            [entry("Same", type="Customized"), entry("X"), entry("Same", type="Customized", id=ID_2)],
            ["[2].name: Same idc, name and owner as entry 0."],
        ),
        (
            [entry("A", id=ID_1), entry("B"), entry("A", id=ID_1.upper())],
            ["[2].id: Same id as entry 0.", "[2].name: Same idc, name and owner as entry 0."],
        ),
    ],
)
def test_duplicate_entries_are_rejected(
    cli: Runner, tmp_path: Path, database_url: str, entries: list[dict[str, Any]], expected: list[str]
) -> None:
    path = write(tmp_path, entries)
    result = cli("catalog", "import", str(path))
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected), result.stderr
    for line, wanted in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}: {wanted}"), line
    assert image_count(database_url) == 0


def test_same_customized_name_for_two_orgs_is_not_a_duplicate(
    cli: Runner, tmp_path: Path, database_url: str
) -> None:
    entries = [entry("Same", type="Customized"), entry("Same", type="Customized", orgId=str(ORG_B))]
    result = cli("catalog", "import", "-o", "json", str(write(tmp_path, entries)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["created"] == 2
    assert image_count(database_url) == 2


def test_output_json_is_one_parseable_document(cli: Runner, tmp_path: Path) -> None:
    path = write(tmp_path, [entry("One"), entry("Two")])
    first = cli("catalog", "import", "--output", "json", str(path))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert set(report) == {"created", "updated", "unchanged", "dryRun", "revision"}
    again = json.loads(cli("catalog", "import", "-o", "json", str(path)).stdout)
    assert again == {"created": 0, "updated": 0, "unchanged": 2, "dryRun": False, "revision": None}


def test_text_output(cli: Runner, tmp_path: Path) -> None:
    path = write(tmp_path, [entry("One"), entry("Two")])
    dry = cli("catalog", "import", "--dry-run", str(path))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == "would be created 2, would be updated 0, would be unchanged 0\n"
    assert cli("catalog", "import", str(path)).stdout == "created 2, updated 0, unchanged 0\n"
    assert cli("catalog", "import", str(path)).stdout == "created 0, updated 0, unchanged 2\n"


def test_an_export_reimports_unchanged(cli: Runner, tmp_path: Path) -> None:
    path = write(
        tmp_path, [entry("One", id=ID_1), entry("Two", type="Customized", createdAt="2026-01-01T00:00:00Z")]
    )
    assert cli("catalog", "import", str(path)).returncode == 0
    exported = cli("catalog", "export")
    assert exported.returncode == 0, exported.stderr
    again = tmp_path / "exported.yaml"
    again.write_text(exported.stdout)
    report = json.loads(cli("catalog", "import", "-o", "json", str(again)).stdout)
    assert report == {"created": 0, "updated": 0, "unchanged": 2, "dryRun": False, "revision": None}
    assert ID_1 in {image["id"] for image in yaml.safe_load(exported.stdout)}
