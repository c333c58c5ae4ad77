"""``cluster-engine images …`` against a real server: every command, output formats, exit codes.

Most tests drive the click app in process (``CliRunner``, with CE_URL / CE_TOKEN in its environment); one
runs the installed ``cluster-engine`` script to check exit codes and shell completion end to end. The
server holds a small fixed catalog (fixed ids and createdAt), read by ``READER``; tests that write use
fresh orgs, so the reader's view never changes. The 80-column table is compared with
``tests/snapshots/images_table_80.txt`` (regenerate with ``UPDATE_SNAPSHOTS=1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import yaml
from click.testing import CliRunner, Result

from cluster_engine.cli import exits
from cluster_engine.cli import images as client_cli
from cluster_engine.cli.main import main
from cluster_engine.client import _sync
from cluster_engine.testing import LiveServer, free_port, image_body

WRITE, ADMIN = "images:write", "images:admin"
READER = uuid.UUID("6a1f3c2e-5b4d-4e8f-9a7b-1c2d3e4f5a6b")
PUBLISHER = uuid.UUID("a1d2c3b4-5e6f-4a7b-8c9d-0e1f2a3b4c5d")
SNAPSHOT = Path(__file__).parent / "snapshots" / "images_table_80.txt"
SCRIPT = Path(sys.executable).with_name("cluster-engine")


def entry(
    image_id: str, idc: str, name: str, os_: tuple[str, str], products: list[str], **extra: Any
) -> dict[str, Any]:
    return image_body(
        PUBLISHER,
        name,
        id=image_id,
        idc=idc,
        path=f"images/{idc}/{name.lower()}.qcow2",
        OSSeries=os_[0],
        OSVersion=os_[1],
        supportedProducts=products,
        **{"type": "Public", **extra},
    )


CATALOG = [
    entry(
        "11111111-1111-4111-8111-111111111111",
        "us-west-1",
        "Ubuntu-22.04",
        ("Ubuntu", "22.04"),
        ["gpu.h100.8x", "gpu.h200.8x", "gpu.a100.8x"],
        createdAt="2026-01-01T00:00:00Z",
    ),
    entry(
        "11112222-2222-4222-8222-222222222222",
        "ap-southeast-1",
        "Ubuntu-24.04-CUDA-12.8-with-a-long-name",
        ("Ubuntu", "24.04"),
        ["gpu.h200.8x"],
        createdAt="2026-01-02T00:00:00Z",
    ),
    entry(
        "33333333-3333-4333-8333-333333333333",
        "eu-central-1",
        "Debian-12",
        ("Debian", "12"),
        ["gpu.l40s.4x"],
        BootMode="Legacy",
        createdAt="2026-01-03T00:00:00Z",
    ),
    entry(
        "44444444-4444-4444-8444-444444444444",
        "us-east-2",
        "team-pytorch-2.5-cuda-12.4",
        ("Rocky Linux", "9.4"),
        ["gpu.b200.8x", "gpu.h100.8x"],
        type="Customized",
        orgId=str(READER),
        createdAt="2026-01-04T00:00:00Z",
    ),
]
IDS = [e["id"] for e in CATALOG]


def image_spec(org: uuid.UUID, name: str = "my-image", **extra: Any) -> dict[str, Any]:
    body = entry("", "us-west-1", name, ("Ubuntu", "24.04"), ["gpu.h100.8x"], orgId=str(org))
    del body["id"], body["type"]
    return {**body, **extra}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer.start(tmp_path_factory.mktemp("cli-client")) as server:
        server.import_catalog(CATALOG)
        yield server


class Cli:
    """``cluster-engine`` in process, with a server's URL and a token in the environment."""

    def __init__(self, server: LiveServer, org: uuid.UUID = READER, scopes: tuple[str, ...] = ()) -> None:
        self.env = {"CE_URL": server.url, "CE_TOKEN": server.token(org, scopes=scopes), "COLUMNS": "80"}

    def __call__(self, *args: str, input: str | None = None, **env: str | None) -> Result:
        result = CliRunner().invoke(main, list(args), input=input, env={**self.env, **env})
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result


@pytest.fixture
def reader(live: LiveServer) -> Cli:
    return Cli(live)


@pytest.fixture
def writer(live: LiveServer) -> Cli:
    return Cli(live, uuid.uuid4(), (WRITE,))


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sync, "time", types.SimpleNamespace(sleep=lambda _delay: None))


# --------------------------------------------------------------------------------------------- list


def test_list_table_at_80_columns_matches_the_snapshot(reader: Cli) -> None:
    result = reader("images", "list", "-o", "table")
    assert result.exit_code == 0, result.stderr
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(result.stdout, encoding="utf-8")
    assert result.stdout == SNAPSHOT.read_text(encoding="utf-8")
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_list_table_uses_a_wider_terminal(reader: Cli) -> None:
    result = reader("images", "list", "-o", "table", COLUMNS="200")
    assert "Ubuntu-24.04-CUDA-12.8-with-a-long-name" in result.stdout
    assert "gpu.h100.8x, gpu.h200.8x, gpu.a100.8x" in result.stdout
    assert "…" not in result.stdout


def test_list_prints_json_when_stdout_is_not_a_terminal(reader: Cli) -> None:
    result = reader("images", "list")
    assert result.exit_code == 0
    assert [image["id"] for image in json.loads(result.stdout)] == IDS
    assert [i["id"] for i in json.loads(reader("images", "list", "--idc", "us-west-1").stdout)] == IDS[:1]
    filtered = reader("images", "list", "--product", "gpu.h100.8x", "-o", "json")
    assert [i["id"] for i in json.loads(filtered.stdout)] == [IDS[0], IDS[3]]
    assert reader("images", "list", "--idc", "nowhere", "-o", "json").stdout.strip() == "[]"


def test_list_prints_a_table_on_a_terminal(reader: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_cli, "_stdout_is_terminal", lambda: True)
    assert reader("images", "list").stdout == SNAPSHOT.read_text(encoding="utf-8")
    empty = reader("images", "list", "--idc", "nowhere")
    assert (empty.exit_code, empty.stdout, empty.stderr) == (0, "", "No images found.\n")


def test_list_yaml_and_id_output(reader: Cli) -> None:
    as_yaml = yaml.safe_load(reader("images", "list", "-o", "yaml").stdout)
    assert as_yaml == json.loads(reader("images", "list", "-o", "json").stdout)
    assert [image["name"] for image in as_yaml] == [e["name"] for e in CATALOG]
    assert reader("images", "list", "-o", "id").stdout.split() == IDS


# ---------------------------------------------------------------------------------------------- get


def test_get_by_id_or_unique_prefix(reader: Cli) -> None:
    full = reader("images", "get", IDS[3], "-o", "json")
    assert full.exit_code == 0
    image = json.loads(full.stdout)
    assert (image["id"], image["type"], image["OSSeries"]) == (IDS[3], "Customized", "Rocky Linux")
    assert json.loads(reader("images", "get", "4444").stdout) == image
    assert yaml.safe_load(reader("images", "get", "33333333", "-o", "yaml").stdout)["BootMode"] == "Legacy"
    table = reader("images", "get", "4444", "-o", "table", COLUMNS="120").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "TYPE", "IDC", "OS", "BOOT", "PRODUCTS"]
    assert table[1].startswith("44444444  team-pytorch-2.5-cuda-12.4  Customized")


def test_get_errors_and_their_exit_codes(reader: Cli) -> None:
    missing = reader("images", "get", str(uuid.uuid4()))
    assert (missing.exit_code, missing.stderr) == (
        exits.NOT_FOUND.code,
        "error: image not found (HTTP 404)\n",
    )
    assert reader("images", "get", "abcdef").exit_code == exits.NOT_FOUND.code  # no id starts with it
    ambiguous = reader("images", "get", "1111")
    assert (
        ambiguous.exit_code == exits.USAGE.code and IDS[0] in ambiguous.stderr and IDS[1] in ambiguous.stderr
    )
    invalid = reader("images", "get", "not-an-id")
    assert invalid.exit_code == exits.INVALID.code
    assert invalid.stderr.splitlines() == [
        "error: Invalid request parameters. (HTTP 400)",
        "  id: Must be a UUID. (got 'not-an-id')",
    ]
    assert reader("images", "get").exit_code == 2  # click's usage error


# ------------------------------------------------------------------------------------------- create


def test_create_from_a_yaml_file_or_stdin(live: LiveServer, tmp_path: Path) -> None:
    org = uuid.uuid4()
    cli = Cli(live, org, (WRITE,))
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump(image_spec(org)), encoding="utf-8")
    created = cli("images", "create", "-f", str(path), "-o", "json")
    assert created.exit_code == 0, created.stderr
    image = json.loads(created.stdout)
    assert (image["name"], image["type"], image["orgId"]) == ("my-image", "Customized", str(org))

    from_stdin = cli(
        "images",
        "create",
        "-f",
        "-",
        "--type",
        "Customized",
        "-o",
        "id",
        input=json.dumps(image_spec(org, "b")),
    )
    assert from_stdin.exit_code == 0
    second = from_stdin.stdout.strip()
    assert str(uuid.UUID(second)) == second
    listed = json.loads(cli("images", "list", "--idc", "us-west-1").stdout)
    assert [i["id"] for i in listed if i["type"] == "Customized"] == [image["id"], second]
    as_yaml = cli("images", "create", "-f", "-", "-o", "yaml", input=yaml.safe_dump(image_spec(org, "c")))
    assert yaml.safe_load(as_yaml.stdout)["name"] == "c"


def test_create_errors_and_their_exit_codes(live: LiveServer, writer: Cli, tmp_path: Path) -> None:
    org = uuid.uuid4()
    cli = Cli(live, org, (WRITE,))
    body = json.dumps(image_spec(org, "dup"))
    assert cli("images", "create", "-f", "-", input=body).exit_code == 0
    duplicate = cli("images", "create", "-f", "-", input=body)
    assert duplicate.exit_code == 6
    assert (
        duplicate.stderr
        == "error: an image with this name already exists in this idc for this owner (HTTP 409)\n"
    )

    invalid = cli(
        "images", "create", "-f", "-", input=json.dumps(image_spec(org, idc="us west", BootMode="BIOS"))
    )
    assert invalid.exit_code == 3
    lines = invalid.stderr.splitlines()
    assert lines[0] == "error: Invalid request parameters. (HTTP 400)"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["BootMode", "idc"]

    public = cli("images", "create", "-f", "-", "--type", "Public", input=json.dumps(image_spec(org, "pub")))
    assert (public.exit_code, public.stderr) == (
        4,
        "error: publishing Public images needs the images:admin scope (HTTP 403)\n",
    )
    read_only = Cli(live, org)("images", "create", "-f", "-", input=json.dumps(image_spec(org, "ro")))
    assert read_only.exit_code == 4
    bad_token = cli("images", "create", "-f", "-", input=body, CE_TOKEN="expired-or-forged")
    assert (bad_token.exit_code, bad_token.stderr) == (4, "error: Invalid access token. (HTTP 401)\n")

    assert cli("images", "create").exit_code == 2  # -f is required
    assert cli("images", "create", "-f", str(tmp_path / "missing.yaml")).exit_code == 2
    not_yaml = cli("images", "create", "-f", "-", input="{unclosed")
    assert not_yaml.exit_code == 2 and "not valid YAML or JSON" in not_yaml.stderr
    assert cli("images", "create", "-f", "-", input="- a\n- list\n").exit_code == 2
    assert cli("images", "create", "-f", "-", "--type", "Private", input=body).exit_code == 2


# ------------------------------------------------------------------------------------------- delete


def test_delete_asks_on_a_terminal_and_refuses_without_yes_otherwise(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = uuid.uuid4()
    cli = Cli(live, org, (WRITE,))
    image_id = cli(
        "images", "create", "-f", "-", "-o", "id", input=json.dumps(image_spec(org, "doomed"))
    ).stdout.strip()

    refused = cli("images", "delete", image_id)  # stdin is not a terminal
    assert (refused.exit_code, refused.stderr) == (
        2,
        "error: refusing to delete without --yes: stdin is not a terminal\n",
    )

    monkeypatch.setattr(client_cli, "_stdin_is_terminal", lambda: True)
    declined = cli("images", "delete", image_id[:8], input="n\n")
    assert declined.exit_code == 1
    assert f"Delete Customized image doomed ({image_id}) in us-west-1? [y/N]" in declined.output
    assert cli("images", "get", image_id).exit_code == 0

    accepted = cli("images", "delete", image_id[:8], input="y\n")
    assert accepted.exit_code == 0 and f"deleted image {image_id}" in accepted.stdout
    assert cli("images", "get", image_id).exit_code == 5

    monkeypatch.setattr(client_cli, "_stdin_is_terminal", lambda: False)
    other = cli(
        "images", "create", "-f", "-", "-o", "id", input=json.dumps(image_spec(org, "other"))
    ).stdout.strip()
    assert cli("images", "delete", other, "--yes").stdout == f"deleted image {other}\n"
    gone = cli("images", "delete", other, "-y")
    assert (gone.exit_code, gone.stderr) == (5, "error: image not found (HTTP 404)\n")
    public = cli("images", "delete", IDS[0], "--yes")
    assert public.exit_code == 4  # visible, but not the caller's to delete


# ------------------------------------------------------------------------------ connection and help


def test_url_and_token_options_before_or_after_the_command(live: LiveServer) -> None:
    token = live.token(READER)
    runner = CliRunner()
    env = {"CE_URL": None, "CE_TOKEN": None}
    for args in (
        ["images", "--url", live.url, "--token", token, "list", "-o", "id"],
        ["images", "list", "-o", "id", "--url", live.url, "--token", token],
        ["images", "--url", "http://127.0.0.1:1", "list", "-o", "id", "--url", live.url, "--token", token],
    ):
        result = runner.invoke(main, args, env=env)
        assert (result.exit_code, result.stdout.split()) == (0, IDS), args
    # typed options win over the environment
    bogus = {"CE_URL": "http://127.0.0.1:1", "CE_TOKEN": "bogus"}
    result = runner.invoke(
        main, ["images", "--url", live.url, "--token", token, "list", "-o", "id"], env=bogus
    )
    assert result.stdout.split() == IDS
    missing = runner.invoke(main, ["images", "list"], env=env)
    assert (missing.exit_code, missing.stderr) == (2, "error: no server URL: pass --url or set CE_URL\n")
    wrong = runner.invoke(main, ["images", "list", "--url", "ce.test:8080"], env=env)
    assert wrong.exit_code == 2 and wrong.stderr.startswith("error: the server URL must be http(s)://")
    no_token = runner.invoke(main, ["images", "list", "--url", live.url], env=env)
    assert (no_token.exit_code, no_token.stderr) == (
        4,
        "error: no token: pass --token or set CE_TOKEN (HTTP 401)\n",
    )


def test_unavailable_server_exits_7(reader: Cli, no_sleep: None, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = reader("images", "list", CE_URL=f"http://127.0.0.1:{free_port()}")
    assert closed.exit_code == exits.UNAVAILABLE.code and closed.stderr.startswith(
        "error: GET http://127.0.0.1:"
    )
    assert "connection failed" in closed.stderr

    def answer_503(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"reason": "database is unavailable"}, headers={"Retry-After": "1"})

    monkeypatch.setattr(
        client_cli, "Client", partial(client_cli.Client, transport=httpx.MockTransport(answer_503))
    )
    unavailable = reader("images", "get", IDS[0])
    assert (unavailable.exit_code, unavailable.stderr) == (7, "error: database is unavailable (HTTP 503)\n")


def test_on_a_terminal_each_wait_is_announced_on_stderr(
    reader: Cli, no_sleep: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_cli, "_on_a_terminal", lambda: True)
    closed = reader("images", "list", CE_URL=f"http://127.0.0.1:{free_port()}")
    assert closed.exit_code == 7
    *waits, last = closed.stderr.splitlines()
    assert len(waits) == 3, closed.stderr  # the default 3 retries
    for line in waits:
        assert line.startswith("the server does not answer (ConnectError); retrying in "), line
        assert line.endswith(" s…")
    assert last.startswith("error: GET http://127.0.0.1:")


def test_off_a_terminal_waits_are_silent(reader: Cli, no_sleep: None) -> None:
    closed = reader("images", "list", CE_URL=f"http://127.0.0.1:{free_port()}")
    assert closed.exit_code == 7 and len(closed.stderr.splitlines()) == 1


def test_help_documents_exit_codes_and_completion(reader: Cli) -> None:
    """Both help pages show the whole table, one row a line: code, name, meaning."""
    for text in (reader("images", "--help").stdout, reader("--help").stdout):
        rows = text[text.index("Exit codes:") :].splitlines()[1 : len(exits.EXIT_CODES) + 1]
        assert [row.split(maxsplit=2) for row in rows] == [
            [str(exit.code), exit.name, exit.meaning] for exit in exits.EXIT_CODES
        ]
    assert [exit.code for exit in exits.EXIT_CODES] == list(range(len(exits.EXIT_CODES)))
    assert len({exit.name for exit in exits.EXIT_CODES}) == len(exits.EXIT_CODES)
    text = reader("images", "--help").stdout
    assert "_CLUSTER_ENGINE_COMPLETE=bash_source cluster-engine" in text
    assert "images" in reader("--help").stdout


def test_clicks_own_exit_codes_are_the_tables() -> None:
    assert click.ClickException.exit_code == exits.ERROR.code  # also Abort (a declined confirmation)
    assert click.UsageError.exit_code == exits.USAGE.code


def test_installed_script_exit_codes_and_id_completion(live: LiveServer) -> None:
    env = {**os.environ, "CE_URL": live.url, "CE_TOKEN": live.token(READER)}
    missing = subprocess.run(
        [SCRIPT, "images", "get", str(uuid.uuid4())], env=env, capture_output=True, text=True, timeout=60
    )
    assert (missing.returncode, missing.stdout) == (5, "")
    assert missing.stderr == "error: image not found (HTTP 404)\n"
    completion = {
        **env,
        "_CLUSTER_ENGINE_COMPLETE": "bash_complete",
        "COMP_WORDS": "cluster-engine images get 4444",
        "COMP_CWORD": "3",
    }
    completed = subprocess.run([SCRIPT], env=completion, capture_output=True, text=True, timeout=60)
    assert completed.stdout.split() == [f"plain,{IDS[3]}"]
