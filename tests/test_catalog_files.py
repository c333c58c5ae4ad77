"""``cluster_engine.storage.catalog_files``: the import's planner (no database), reading catalog files as
streams, export byte for byte as before, the fast path of catalog validation; and the commands on each store.

The end-to-end behaviour against a live server is in tests/test_catalog_import.py.
"""

from __future__ import annotations

import collections
import copy
import datetime as dt
import io
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster_engine.cli.main import main
from cluster_engine.invalid import Invalid
from cluster_engine.rules.catalog_entries import (
    CatalogEntry,
    _checked_catalog_entry,
    _fast_catalog_entry,
    read_catalog_entries,
)
from cluster_engine.schemas import ImageBootMode, ImageResp, ImageType, Partition, json_encoder
from cluster_engine.storage import catalog_files
from cluster_engine.storage.catalog_files import (
    CatalogFileError,
    CatalogSource,
    ExistingIndex,
    Planner,
    Progress,
    Write,
    body_digest,
    exporting,
)
from cluster_engine.storage.errors import Duplicate
from cluster_engine.storage.records import Ids, ImportReport, image_of_body, make_image
from cluster_engine.testing import image_body
from cluster_engine.testing.stores import in_store

from .conftest import STORES, Databases

ORG = uuid.UUID("0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01")
OTHER = uuid.UUID("5d6c8a0e-9b1f-4e2a-8c3d-7f6e5d4c3b2a")
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
STORED_AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def raw(name: str, **changes: Any) -> dict[str, Any]:
    return image_body(ORG, name, **changes)


def entries(*items: dict[str, Any]) -> list[CatalogEntry]:
    return read_catalog_entries(list(items))


# ------------------------------------------------------------------------------- the fast path of validation

TEXTS = ["", " ", "ok", "a b", "x" * 300, "x" * 51, "a\x00b", "a\n", "é", "Ubuntu-22.04", "-lead", "tail-"]
UUIDS = [
    str(ORG),
    str(ORG).upper(),
    ORG.hex,
    f"{{{ORG}}}",
    f"urn:uuid:{ORG}",
    str(ORG).replace("4", "_", 1),
    str(ORG)[:-1] + "g",
    str(ORG) + "\n",
]
TIMES = [
    "2026-01-15T09:00:00Z",
    "2026-01-15T14:30:00+05:30",
    "2026-01-15T09:00:00",
    "2026-01-15",
    "2026-13-15T09:00:00Z",
    "2026-01-15 09:00:00Z",
    dt.datetime(2026, 1, 15, 9),
    dt.datetime(2026, 1, 15, 9, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.date(2026, 1, 15),
    1_700_000_000,
]
ODD: list[Any] = [None, 5, 1.5, True, [], {}, ("a",), collections.OrderedDict(a="x"), *TEXTS, *UUIDS, *TIMES]
PARTITIONS: list[Any] = [
    [],
    [{"name": "root", "mountPoint": "/", "size": "1G", "fileSystem": "ext4"}],
    [{"name": "root", "mountPoint": "", "size": "1G", "fileSystem": "ext4"}],
    [{"name": "bad name!", "mountPoint": "/", "size": "1G", "fileSystem": "ext4"}],
    [{"name": "root", "mountPoint": "/", "size": "1G"}],
    [{"name": "root", "mountPoint": "/", "size": "1G", "fileSystem": "e\x00"}],
    [{"name": "root", "mountPoint": "/" * 1025, "size": "1G", "fileSystem": "ext4"}],
    [collections.UserDict(name="root", mountPoint="/", size="1G", fileSystem="ext4")],
    [collections.OrderedDict(name="root", mountPoint="/", size="1G", fileSystem="ext4")],
    ({"name": "root", "mountPoint": "/", "size": "1G", "fileSystem": "ext4"},),
    ["root"],
]
PRODUCTS: list[Any] = [
    [],
    ["a", "a"],
    ["bad product"],
    ["x" * 257],
    [5],
    ("a",),
    "a",
    [None],
    ["ok.1", "ok-2"],
]
FIELDS = [*raw("x"), "type", "id", "createdAt"]


def values_for(name: str) -> st.SearchStrategy[Any]:
    special = {
        "DefaultPartitionTable": PARTITIONS,
        "supportedProducts": PRODUCTS,
        "BootMode": ["UEFI", "Legacy", "uefi"],
        "type": ["Public", "Customized", "public"],
        "icon": ["https://x.example/i.svg", "http://", "urn:x", "not a uri", "https://[::1"],
    }
    return st.sampled_from(special.get(name, []) + ODD)


@st.composite
def catalog_items(draw: st.DrawFn) -> Any:
    item: dict[str, Any] = raw(
        "Base", type="Customized", id=str(uuid.uuid4()), createdAt="2026-01-15T09:00:00Z"
    )
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()) and name in item:
            del item[name]
        else:
            item[name] = copy.deepcopy(draw(values_for(name)))
    return item


@settings(max_examples=600, deadline=None)
@given(catalog_items())
def test_the_fast_path_accepts_only_what_the_checks_accept_and_reads_it_alike(item: Any) -> None:
    problems: list[Any] = []
    checked = _checked_catalog_entry(copy.deepcopy(item), 0, problems)
    fast = _fast_catalog_entry(copy.deepcopy(item))
    if fast is not None:
        assert checked is not None and not problems, (item, problems)
        assert fast == checked


def test_the_fast_path_takes_valid_entries() -> None:
    for item in [
        raw("A"),
        raw("A", type="Customized", id=str(ORG).upper(), createdAt="2026-01-15T14:30:00+05:30"),
        raw("A", supportedProducts=[], type=None, id=None, createdAt=None),
        raw("A b.c", extra={"ignored": True}),
    ]:
        problems: list[Any] = []
        fast = _fast_catalog_entry(item)
        assert fast is not None and fast == _checked_catalog_entry(item, 0, problems)
    assert not problems


def test_not_valid_entries_fall_through_to_the_checks_messages() -> None:
    with pytest.raises(Invalid) as caught:
        read_catalog_entries([raw("A"), raw("B", id="nope"), 7])
    assert [d.field for d in caught.value.details] == ["[1].id", "[2]"]


# --------------------------------------------------------------------------------------------- the planner


class Stored:
    """An ExistingIndex built from images as the store would hold them."""

    def __init__(self) -> None:
        self.index = ExistingIndex()
        self.ids: dict[str, uuid.UUID] = {}

    def add(self, name: str, *, image_type: ImageType = ImageType.PUBLIC, **changes: Any) -> uuid.UUID:
        (entry,) = entries(raw(name, **changes))
        image_id = uuid.uuid4()
        image = make_image(image_id, image_type, entry.spec, STORED_AT)
        namespace = catalog_files.namespace_of(image_type, entry.spec.orgId)
        body = json_encoder.encode(image)
        self.index.add(image_id.int, namespace, entry.spec.idc, entry.spec.name, body_digest(body), STORED_AT)
        self.ids[name] = image_id
        return image_id


def plan(
    stored: Stored, items: list[dict[str, Any]], *, prune: bool = False
) -> tuple[ImportReport, list[Write], catalog_files.Plan]:
    report = ImportReport()
    planner = Planner(stored.index, report, prune=prune, now=NOW)
    now = [w for position, e in enumerate(entries(*items)) if (w := planner.add(position, e)) is not None]
    return report, now, planner.finish()


def test_created_updated_unchanged() -> None:
    stored = Stored()
    a, b = stored.add("A"), stored.add("B")
    report, now, later = plan(
        stored,
        [
            raw("A", createdAt=STORED_AT.isoformat()),  # found by identity; the same body
            raw("Renamed", id=str(b)),  # found by id; renamed to a free name
            raw("C", createdAt="2026-02-01T00:00:00Z"),
            raw("D"),
        ],
    )
    assert list(report.unchanged) == [a] and list(report.updated) == [b]
    assert [w.kind for w in now] == ["update", "create", "create"]
    update, c, d = now
    assert (update.image_id, update.created_at, update.set_created) == (b, STORED_AT, False)
    assert image_of_body(update.body).name == "Renamed"
    assert c.created_at == dt.datetime(2026, 2, 1, tzinfo=dt.UTC) and d.created_at == NOW
    assert list(report.created) == [c.image_id, d.image_id]
    assert later.deleted == [] and later.deferred == []


def test_the_body_decides_unchanged() -> None:
    stored = Stored()
    stored.add("A", supportedProducts=["p1", "p2"])
    for changes, updated in [
        ({"supportedProducts": ["p1", "p2"]}, 0),
        ({"supportedProducts": ["p2", "p1"]}, 1),  # the order is served: a change
        ({"supportedProducts": ["p1", "p2", "p1"]}, 0),  # duplicates carry no meaning
        ({"supportedProducts": ["p1", "p2"], "createdAt": "2026-01-01T02:00:00+02:00"}, 0),
        ({"supportedProducts": ["p1", "p2"], "createdAt": "2026-01-01T00:00:00.000001Z"}, 1),
        ({"supportedProducts": ["p1", "p2"], "type": "Customized"}, 0),  # another image (owner)
    ]:
        report, _, _ = plan(stored, [raw("A", **changes)])
        assert len(report.updated) == updated, changes


def test_the_rendered_body_is_the_stored_one() -> None:
    (entry,) = entries(raw("A", createdAt="2026-01-15T14:30:00+05:30"))
    image_id = uuid.uuid4()
    created = entry.created_at or NOW
    wanted = json_encoder.encode(make_image(image_id, entry.type, entry.spec, created))
    assert catalog_files.planning._render(image_id, entry, created) == wanted


def problems(call: Callable[[], Any]) -> list[str]:
    with pytest.raises(Invalid) as caught:
        call()
    return [f"{d.field}: {d.reason}" for d in caught.value.details]


def test_duplicate_entries_name_the_entry_before_them() -> None:
    stored = Stored()
    x = stored.add("X")
    one = str(uuid.uuid4())
    items = [raw("A", id=one), raw("B", id=one), raw("C", id=one), raw("X", id=str(x)), raw("X")]
    assert problems(lambda: plan(stored, items)) == [
        "[1].id: Same id as entry 0.",
        "[2].id: Same id as entry 1.",
        "[4].name: Same idc, name and owner as entry 3.",
    ]


def test_two_entries_for_one_image() -> None:
    stored = Stored()
    x = stored.add("X")
    # the first renames X, the second names X by its (old) identity
    assert problems(lambda: plan(stored, [raw("Y", id=str(x)), raw("X")])) == [
        "[1]: Refers to the same image as entry 0."
    ]


def test_after_a_problem_nothing_more_is_written() -> None:
    stored = Stored()
    report = ImportReport()
    planner = Planner(stored.index, report, prune=False, now=NOW)
    a, b, c = entries(raw("A"), raw("A", path="other"), raw("C"))
    assert planner.add(0, a) is not None
    assert planner.add(1, b) is None and planner.add(2, c) is None
    planner.skip()
    assert planner.add(3, c) is None


def test_names_swapped_and_rotated_wait_for_the_end() -> None:
    stored = Stored()
    a, b, c = stored.add("A"), stored.add("B"), stored.add("C")
    report, now, later = plan(stored, [raw("B", id=str(a)), raw("C", id=str(b)), raw("A", id=str(c))])
    assert now == [] and len(report.updated) == 3
    assert [w.image_id for w in later.deferred] == [a, b, c]


def test_a_name_taken_by_an_image_that_stays_is_a_conflict() -> None:
    stored = Stored()
    a, _ = stored.add("A"), stored.add("B")
    with pytest.raises(Duplicate, match="us-west-1/B: an image with this name already exists"):
        plan(stored, [raw("B", id=str(a))])
    with pytest.raises(Duplicate, match="us-west-1/A"):  # a new id for a stored name
        plan(stored, [raw("A", id=str(uuid.uuid4()))])
    # updates are named before creates, as the store always did
    with pytest.raises(Duplicate, match="us-west-1/B"):
        plan(stored, [raw("A", id=str(uuid.uuid4())), raw("B", id=str(a), path="x")])


def test_prune_deletes_public_images_left_out_and_frees_their_names() -> None:
    stored = Stored()
    keep, drop = stored.add("Keep"), stored.add("Drop")
    stored.add("Own", image_type=ImageType.CUSTOMIZED)
    fresh = uuid.uuid4()
    items = [raw("Keep"), raw("Drop", id=str(fresh))]  # a new image takes the name of one pruned
    with pytest.raises(Duplicate):
        plan(stored, items)
    report, now, later = plan(stored, items, prune=True)
    assert list(report.unchanged) == [keep] and list(report.deleted) == [drop]
    assert now == [] and later.deleted == [drop] and [w.image_id for w in later.deferred] == [fresh]


def test_an_index_is_compact() -> None:
    index = ExistingIndex()
    image_id = uuid.uuid4()
    index.add(image_id.int, "public", "idc", "name", b"d" * 16, STORED_AT)
    assert len(index) == 1 and index.image_id(0) == image_id and index.created_at(0) == STORED_AT
    assert index.digest(0) == b"d" * 16 and index.public[0] == 1


def test_report_ids() -> None:
    ids = Ids([ORG, OTHER])
    ids.append(ORG)
    assert len(ids) == 3 and list(ids) == [ORG, OTHER, ORG] and ids[-1] == ORG and ids[1:] == [OTHER, ORG]
    assert ids == [ORG, OTHER, ORG] and repr(ids) == "<3 image ids>"
    with pytest.raises(IndexError):
        ids[3]


# ----------------------------------------------------------------------------------------------- reading


class Pipe(io.RawIOBase):
    """A stream that can only be read, in small pieces (as from a pipe)."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.data.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def read_items(data: bytes, *, pipe: bool = False) -> tuple[list[Any], CatalogSource]:
    """The entries as the import sees them: those that passed every check already as CatalogEntry."""
    file: Any = io.BufferedReader(Pipe(data)) if pipe else io.BytesIO(data)
    source = CatalogSource(file, "catalog")
    try:
        return list(source.items()), source
    except catalog_files.reading._NotJson as problem:
        again = source.as_yaml(problem)
        return list(again.items()), again


def as_read(items: list[Any]) -> list[Any]:
    """Entries as the import validates them: CatalogEntry when they pass, else as decoded."""
    found = []
    for item in items:
        entry = item if type(item) is CatalogEntry else _fast_catalog_entry(copy.deepcopy(item))
        found.append(item if entry is None else entry)
    return found


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_files.reading, "JSON_BLOCK", 700)


@pytest.mark.parametrize("pipe", [False, True])
@pytest.mark.parametrize("indent", [None, 1])
def test_json_is_read_as_a_stream(pipe: bool, indent: int | None, small_blocks: None) -> None:
    items: list[Any] = [raw(f"Image-{i}", id=str(uuid.uuid4()), note="é},{" * i) for i in range(60)]
    items[7]["idc"] = "bad idc"  # handed on raw, for the checks to name
    items[9] = {"nested": [{"a": [1, {"b": "}, {"}]}]}
    items[10] = 5
    data = b" " * 2000 + json.dumps(items, indent=indent).encode()
    found, source = read_items(data, pipe=pipe)
    assert as_read(found) == as_read(items) and source.reader is not None and source.position == len(data)
    assert type(found[0]) is CatalogEntry and found[7] == items[7] and found[10] == 5


@pytest.mark.parametrize("content", [b"[]", b" [ ] ", b"[\n]\n"])
def test_empty_json_arrays(content: bytes, small_blocks: None) -> None:
    assert read_items(content)[0] == []


def test_what_cannot_be_cut_is_read_by_ijson(monkeypatch: pytest.MonkeyPatch, small_blocks: None) -> None:
    monkeypatch.setattr(catalog_files.reading, "JSON_PENDING_MAX", 1000)
    items = [list(range(300)), raw("A"), "text"]  # no "}," to cut at in the first 1000 bytes
    found, _ = read_items(json.dumps(items).encode())
    assert as_read(found) == as_read(items)


@pytest.mark.parametrize(
    "content",
    [b'[{"a": 1}, {"b": 2}, ]', b'[{"a": 1}, {"b": 2}] [3]', b'[{"a": 1},, {"b": 2}]', b'[{"a": 1}, {"b": '],
)
def test_json_that_is_not(content: bytes, small_blocks: None) -> None:
    source = CatalogSource(io.BytesIO(content * 1 if len(content) > 700 else b" " * 800 + content), "c")
    with pytest.raises(catalog_files.reading._NotJson):
        list(source.items())


@pytest.mark.parametrize("pipe", [False, True])
def test_yaml_flow_style_that_looks_like_json_is_read_as_yaml(pipe: bool) -> None:
    found, source = read_items(b'[{"a": 1}, {b: 2, c: 2026-01-15}]', pipe=pipe)
    assert found == [{"a": 1}, {"b": 2, "c": dt.date(2026, 1, 15)}] and source.reader is None


def test_a_large_file_that_starts_like_json_is_json_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_files.reading, "YAML_RETRY_BYTES", 1000)
    data = json.dumps([raw(f"I-{i}") for i in range(20)]).encode()[:-40]  # cut off
    with pytest.raises(CatalogFileError, match=r"catalog: not valid YAML or JSON: .* read as JSON only"):
        read_items(data)
    assert read_items(b"[1, 2]")[0] == [1, 2]  # small files are not affected


def test_other_files_are_read_whole() -> None:
    assert read_items(b"- a: 1\n- b\n")[0] == [{"a": 1}, "b"]
    with pytest.raises(Invalid):
        read_items(b'{"a": 1}')
    with pytest.raises(CatalogFileError, match="not valid YAML or JSON"):
        read_items(b"- \xff\n")


def test_progress_shows_on_a_terminal_only() -> None:
    shown, hidden = io.StringIO(), io.StringIO()
    for stream, enabled in ((shown, True), (hidden, False)):
        progress = Progress(stream, enabled=enabled, delay=0)
        progress.phase("catalog import: importing")
        progress.update("5 entries", force=True)
        progress.close()
    assert "catalog import: importing 5 entries" in shown.getvalue() and shown.getvalue().endswith("\n")
    assert hidden.getvalue() == ""
    assert Progress(io.StringIO()).enabled is False  # not a terminal


# --------------------------------------------------------------------------------------------- exporting

ODD_STRINGS = [
    "plain",
    "é ü 中文 😀",
    "tab\there",
    "new\nline",
    'quote " and \\ backslash',
    "del\x7f",
    "ctl\x01\x1f",
    "nel\x85",
    "sep\u2028",
    "yes",
    "null",
    "1.0",
    "0x1F",
    "2026-01-01",
    "- x",
    "a: b",
    "#c",
    " lead",
    "trail ",
    "",
    "'single'",
    "word " * 30,
    "x" * 200,
    "@at",
    "%p",
    "\ufeffbom",
]


def odd_images() -> Iterator[ImageResp]:
    for i, text in enumerate(ODD_STRINGS):
        yield ImageResp(
            id=uuid.UUID(int=i),
            type=ImageType.PUBLIC if i % 2 else ImageType.CUSTOMIZED,
            orgId=ORG,
            idc="us-west-1",
            name=f"Image-{i}",
            path=text,
            OSSeries=ODD_STRINGS[-1 - i],
            OSVersion="22.04",
            OSArchitecture=text,
            BootMode=ImageBootMode.UEFI,
            SystemDiskSize="200G",
            DefaultPartitionTable=[
                Partition(name="root", mountPoint=text or "/", size="1G", fileSystem="ext4")
            ],
            icon="https://static.example.com/i.svg",
            supportedProducts=[] if i % 3 == 0 else ["a", text or "b"],
            createdAt=STORED_AT + dt.timedelta(microseconds=i * 1000),
        )


def as_before(images: list[ImageResp], output: str) -> bytes:
    """What ``catalog export`` wrote before it streamed: the whole list at once."""
    listed = [msgspec.to_builtins(image) for image in images]
    if output == "json":
        return (json.dumps(listed, indent=2) + "\n").encode()
    return yaml.safe_dump(listed, sort_keys=False, allow_unicode=True).encode()


@pytest.mark.parametrize("output", ["json", "yaml"])
@pytest.mark.parametrize("batch", [1, 4, 100])
def test_exports_write_what_the_whole_list_did(output: str, batch: int) -> None:
    images = list(odd_images())
    for chosen in (images, images[:1], []):
        out = io.BytesIO()
        writer: Any = exporting._JsonList(out) if output == "json" else exporting._YamlList(out)
        bodies = [json_encoder.encode(image) for image in chosen]
        for start in range(0, len(bodies), batch):
            writer.write(bodies[start : start + batch])
        writer.close()
        assert out.getvalue() == as_before(chosen, output)
        assert writer.count == len(chosen)


# ---------------------------------------------------------------------------------- the commands, per store


@pytest.fixture(params=STORES)
def url(request: pytest.FixtureRequest, databases: Databases, tmp_path: Path) -> str:
    address = databases.migrated(request.param, tmp_path)
    return address


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(tmp_path: Path, url: str) -> Run:
    runner = CliRunner()
    env = {"CE_DATA_DIR": str(tmp_path), "CE_DATABASE_URL": url}

    def run(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


def import_file(cli: Run, tmp_path: Path, items: list[dict[str, Any]], *args: str) -> dict[str, Any]:
    path = tmp_path / f"catalog-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(items))
    code, out, err = cli("catalog", "import", str(path), "-o", "json", *args)
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


def names(url: str) -> dict[str, str]:
    return {str(image.id): image.name for image in in_store(url, lambda store: store.export_catalog())}


def test_rotations_prunes_and_their_audit_rows(cli: Run, tmp_path: Path, url: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    items = [raw(name, id=image_id) for name, image_id in zip("ABCD", ids, strict=True)]
    first = import_file(cli, tmp_path, items)
    assert first["created"] == 4
    # A→B→C→A in one file, D pruned and its name taken by a new image
    fresh = str(uuid.uuid4())
    rotated = [raw("B", id=ids[0]), raw("C", id=ids[1]), raw("A", id=ids[2]), raw("D", id=fresh)]
    dry = import_file(cli, tmp_path, rotated, "--prune", "--dry-run")
    assert (dry["updated"], dry["created"], dry["deleted"], dry["revision"]) == (3, 1, 1, None)
    assert names(url) == dict(zip(ids, "ABCD", strict=True))
    report = import_file(cli, tmp_path, rotated, "--prune")
    assert (report["updated"], report["created"], report["deleted"]) == (3, 1, 1)
    assert names(url) == {ids[0]: "B", ids[1]: "C", ids[2]: "A", fresh: "D"}
    assert import_file(cli, tmp_path, rotated, "--prune")["revision"] is None  # idempotent
    rows = in_store(url, lambda store: store.audit_entries())
    last = [r for r in rows if r["revision"] == report["revision"]]
    assert sorted((r["action"], r["imageId"]) for r in last) == sorted(
        [("update", ids[0]), ("update", ids[1]), ("update", ids[2]), ("create", fresh), ("delete", ids[3])]
    )
    by_image = {r["imageId"]: r for r in last}
    assert by_image[ids[0]]["changes"] == {
        "name": {"from": "A", "to": "B"},
        "path": {"from": "images/a.qcow2", "to": "images/b.qcow2"},
    }
    assert by_image[ids[3]]["changes"]["name"] == "D" and by_image[fresh]["changes"]["id"] == fresh
    assert {r["actor"] for r in last} == {"cli:catalog-import"}


def test_updates_keep_or_set_created_at(cli: Run, tmp_path: Path, url: str) -> None:
    image_id = str(uuid.uuid4())
    import_file(cli, tmp_path, [raw("A", id=image_id, createdAt="2026-01-15T09:00:00.123456Z")])
    import_file(cli, tmp_path, [raw("A", id=image_id, OSVersion="24.04")])
    (image,) = in_store(url, lambda store: store.export_catalog())
    assert image.OSVersion == "24.04" and image.createdAt == dt.datetime(
        2026, 1, 15, 9, 0, 0, 123456, tzinfo=dt.UTC
    )
    import_file(cli, tmp_path, [raw("A", id=image_id, OSVersion="24.04", createdAt="2020-01-01T00:00:00Z")])
    (image,) = in_store(url, lambda store: store.export_catalog())
    assert image.createdAt == dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_export_writes_what_it_wrote_before(cli: Run, tmp_path: Path, url: str, output: str) -> None:
    items = [
        raw(f"Image-{i}", path=text, OSSeries=text, type="Customized" if i % 2 else "Public")
        for i, text in enumerate(ODD_STRINGS)
        if "\x00" not in text
    ]
    import_file(cli, tmp_path, items)
    images = in_store(url, lambda store: store.export_catalog())
    code, out, err = cli("catalog", "export", "-o", output)
    assert code == 0 and err == ""
    assert out.encode() == as_before(images, output)
    code, out, _ = cli("catalog", "export", "-o", output, "--type", "Public")
    assert out.encode() == as_before([i for i in images if i.type is ImageType.PUBLIC], output)


def test_problems_beyond_the_kept_are_counted(
    cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_files.shared, "PROBLEMS_KEPT", 3)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([raw(f"I-{i}", idc="bad idc") for i in range(5)]))
    code, out, err = cli("catalog", "import", str(path))
    assert code == 3 and out == ""
    assert err.splitlines() == [
        *(f"{path}: [{i}].idc: Must match the pattern ^[a-zA-Z0-9._-]+$. (got 'bad idc')" for i in range(3)),
        f"{path}: … and 2 more problems",
    ]
