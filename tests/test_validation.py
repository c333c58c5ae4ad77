"""Unit tests of ``cluster_engine.server.validation``: query parameters, path ids, image bodies and catalog
files."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster_engine.invalid import Invalid
from cluster_engine.rules.catalog_entries import read_catalog_entries
from cluster_engine.schemas import ImageType, ValidationDetail
from cluster_engine.server.bodies import read_image_create
from cluster_engine.server.errors import RequestInvalid
from cluster_engine.server.validation import ListQuery, image_id, list_query, original
from cluster_engine.testing.samples import image_body, image_spec

ORG = "0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01"
ORIGINAL_MAX = 257  # 256 characters and an ellipsis

VALID: dict[str, Any] = image_body(ORG)
REQUIRED = list(VALID)
STRING_FIELDS = ["idc", "orgId", "path", "name", "OSSeries", "OSVersion", "OSArchitecture", "BootMode"]
STRING_FIELDS += ["SystemDiskSize", "icon"]


def body(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data.update(changes)
    return data


def problems(data: Any, prefix: str = "") -> list[ValidationDetail]:
    out: list[ValidationDetail] = []
    result = read_image_create(data, out, prefix)
    assert (result is None) == bool(out), "a result exactly when nothing is wrong"
    for item in out:
        assert isinstance(item.originalValue, str)
        assert len(item.originalValue) <= ORIGINAL_MAX
    return out


def pairs(details: list[ValidationDetail]) -> list[tuple[str, str]]:
    return [(d.field, d.expression) for d in details]


def query_error(params: dict[str, list[str]]) -> list[tuple[str, str]]:
    with pytest.raises(RequestInvalid) as caught:
        list_query(params)
    assert caught.value.status == 400
    for item in caught.value.details:
        assert isinstance(item.originalValue, str)
    return pairs(caught.value.details)


# ------------------------------------------------------------------------------------------ list_query


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ListQuery(idc=None, product=None)),
        ({"idc": []}, ListQuery(idc=None, product=None)),
        ({"idc": ["us-west-1"]}, ListQuery(idc="us-west-1", product=None)),
        ({"product": ["gpu.h100.8x"]}, ListQuery(idc=None, product="gpu.h100.8x")),
        ({"idc": ["A.b_c-9"], "product": ["x"]}, ListQuery(idc="A.b_c-9", product="x")),
        ({"idc": ["a" * 50], "product": ["p" * 256]}, ListQuery(idc="a" * 50, product="p" * 256)),
        ({"page": ["2"], "x": ["%%", "bad value"], "idc": ["eu-1"]}, ListQuery(idc="eu-1", product=None)),
    ],
)
def test_list_query_accepts(params: dict[str, list[str]], expected: ListQuery) -> None:
    assert list_query(params) == expected


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"idc": ["bad idc"]}, [("idc", "pattern")]),
        ({"idc": [""]}, [("idc", "pattern")]),
        ({"idc": ["us-west-1\n"]}, [("idc", "pattern")]),  # `$` would let a trailing newline through
        ({"idc": ["\nus-west-1"]}, [("idc", "pattern")]),
        ({"idc": ["us/west"]}, [("idc", "pattern")]),
        ({"idc": ["üs-west-1"]}, [("idc", "pattern")]),
        ({"idc": ["١٢٣"]}, [("idc", "pattern")]),  # non-ASCII digits are not [0-9]
        ({"idc": ["a" * 51]}, [("idc", "max")]),
        ({"idc": ["a b" * 30]}, [("idc", "max")]),  # one detail per field: the length is reported first
        ({"product": ["gpu/h100"]}, [("product", "pattern")]),
        ({"product": ["gpu.h100\n"]}, [("product", "pattern")]),
        ({"product": ["p" * 257]}, [("product", "max")]),
        ({"idc": ["a", "b"]}, [("idc", "single")]),
        ({"idc": ["a", "a"]}, [("idc", "single")]),
        ({"product": ["x", "y", "z"]}, [("product", "single")]),
        ({"idc": ["a b"], "product": ["c d"]}, [("idc", "pattern"), ("product", "pattern")]),
        ({"idc": ["a", "b"], "product": ["p" * 300]}, [("idc", "single"), ("product", "max")]),
    ],
)
def test_list_query_rejects(params: dict[str, list[str]], expected: list[tuple[str, str]]) -> None:
    assert query_error(params) == expected


def test_list_query_details_carry_pattern_and_original_value() -> None:
    with pytest.raises(RequestInvalid) as caught:
        list_query({"idc": ["bad idc"], "product": ["p" * 1000]})
    idc, product = caught.value.details
    assert idc.argument == "^[a-zA-Z0-9._-]+$" and idc.originalValue == "bad idc"
    assert product.argument == "256" and len(product.originalValue) <= ORIGINAL_MAX
    assert product.originalValue.startswith("p" * 256)


def test_list_query_repeated_value_is_reported_as_a_string() -> None:
    with pytest.raises(RequestInvalid) as caught:
        list_query({"idc": ["a", "b"]})
    assert caught.value.details[0].originalValue == '["a","b"]'


@settings(max_examples=200)
@given(st.text(max_size=60))
def test_list_query_idc_matches_the_contract_pattern(value: str) -> None:
    valid = 0 < len(value) <= 50 and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)
    if valid:
        assert list_query({"idc": [value]}).idc == value
    else:
        assert query_error({"idc": [value]}) in ([("idc", "pattern")], [("idc", "max")])


# -------------------------------------------------------------------------------------------- image_id


@pytest.mark.parametrize(
    "raw",
    [
        "0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01",
        "0B7E2F52-4C1A-4D52-9A57-2F1C3C2D9E01",
        "00000000-0000-0000-0000-000000000000",
    ],
)
def test_image_id_accepts_canonical_uuids_in_any_case(raw: str) -> None:
    assert image_id(raw) == uuid.UUID(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not-a-uuid",
        "0b7e2f524c1a4d529a572f1c3c2d9e01",  # no hyphens
        "{0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01}",
        "urn:uuid:0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01",
        "0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e0g",
        "0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01\n",
        "0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e0",
    ],
)
def test_image_id_rejects(raw: str) -> None:
    with pytest.raises(RequestInvalid) as caught:
        image_id(raw)
    assert pairs(caught.value.details) == [("id", "uuid")]
    assert caught.value.details[0].originalValue == raw


# 36 characters, but not the canonical 8-4-4-4-12 form; uuid.UUID() strips "urn:", braces and every hyphen
# and int(…, 16) accepts a sign, so these parse (the last one to a different value than its digits).
NON_CANONICAL = [
    "urn:0b7e2f524c1a4d529a572f1c3c2d9e01",
    "0b7e2f524c1a4d529a572f1c3c2d9e01----",
    "{0b7e2f524c1a4d52-9a572f1c3c2d9e01-}",
    "+b7e2f524c1a4d529a572f1c3c2d9e01----",
]


@pytest.mark.parametrize("raw", NON_CANONICAL)
def test_image_id_rejects_non_canonical_36_character_spellings(raw: str) -> None:
    with pytest.raises(RequestInvalid):
        image_id(raw)


@pytest.mark.parametrize("raw", NON_CANONICAL)
def test_org_id_rejects_non_canonical_36_character_spellings(raw: str) -> None:
    assert pairs(problems(body(orgId=raw))) == [("orgId", "uuid")]


# ------------------------------------------------------------------------------------ read_image_create


def test_valid_body_is_read_into_an_image_create_req() -> None:
    out: list[ValidationDetail] = []
    spec = read_image_create(body(unknown="ignored", type="Public"), out)
    assert out == []
    assert spec == image_spec(ORG)  # the sample body, decoded by msgspec alone


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("how", ["missing", "null"])
def test_each_required_field(name: str, how: str) -> None:
    data = body()
    if how == "missing":
        del data[name]
    else:
        data[name] = None
    details = problems(data)
    assert pairs(details) == [(name, "required")]
    assert details[0].originalValue == "" and details[0].reason == "This field is required."


def test_every_missing_field_is_reported_in_order() -> None:
    assert pairs(problems({})) == [(name, "required") for name in REQUIRED]


def test_every_problem_is_reported_at_once() -> None:
    data = body(idc="bad idc", name="-x", BootMode="bios", icon="nope", orgId="x", supportedProducts=["a b"])
    assert pairs(problems(data)) == [
        ("idc", "pattern"),
        ("orgId", "uuid"),
        ("name", "pattern"),
        ("BootMode", "oneof"),
        ("icon", "uri"),
        ("supportedProducts[0]", "pattern"),
    ]


@pytest.mark.parametrize("name", STRING_FIELDS)
@pytest.mark.parametrize("value", [5, 1.5, True, ["x"], {"a": 1}])
def test_string_fields_reject_other_types(name: str, value: Any) -> None:
    details = problems(body(**{name: value}))
    assert pairs(details) == [(name, "type")]
    assert details[0].argument == "string"


# field, the rule each value breaks, the values
VIOLATIONS: list[tuple[str, str, list[Any]]] = [
    ("idc", "pattern", ["us west", "", "us-west-1\n"]),
    ("idc", "max", ["a" * 51]),
    ("name", "pattern", ["-leading", "trailing ", "trailing.", "", "a/b", "ok\n"]),
    ("name", "max", ["a" * 256]),
    ("orgId", "uuid", ["not-a-uuid", "", ORG.replace("-", ""), "{" + ORG + "}"]),
    ("BootMode", "oneof", ["uefi", "BIOS", ""]),
    ("icon", "uri", ["not a uri", "static.example.com/ubuntu.svg", "/relative/path.svg", ""]),
    ("icon", "uri", ["https://example.com/a b.svg", "https://example.com/\n"]),
    ("supportedProducts", "type", ["gpu.h100.8x", {"a": 1}]),
    ("DefaultPartitionTable", "min", [[]]),
    ("DefaultPartitionTable", "type", [{"name": "root"}, "root"]),
]


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [(field, value, rule) for field, rule, values in VIOLATIONS for value in values],
)
def test_constraint_violations(field: str, value: Any, rule: str) -> None:
    assert pairs(problems(body(**{field: value}))) == [(field, rule)]


@pytest.mark.parametrize(
    "changes",
    [
        {"idc": "a" * 50},
        {"idc": "A.b_c-9"},
        {"name": "a"},
        {"name": "Rocky Linux 9.4_minimal-x"},
        {"name": "a" * 255},
        {"orgId": ORG.upper()},
        {"BootMode": "Legacy"},
        {"icon": "mailto:ops@example.com"},
        {"icon": "data:image/svg+xml;base64,PHN2Zz4="},
        {"path": ""},  # the contract gives path no minLength
        {"supportedProducts": []},  # nor supportedProducts a minItems
        {"supportedProducts": ["p" * 256]},
    ],
)
def test_boundary_values_are_accepted(changes: dict[str, Any]) -> None:
    assert problems(body(**changes)) == []


def test_details_carry_arguments() -> None:
    by_field = {
        d.field: d
        for d in problems(
            body(idc="a" * 51, name="-x", BootMode="bios", DefaultPartitionTable=[], supportedProducts=5)
        )
    }
    assert by_field["idc"].argument == "50"
    assert by_field["name"].argument == r"^([A-Za-z0-9][A-Za-z0-9_\-. ]*)?[A-Za-z0-9]$"
    assert by_field["BootMode"].argument == "UEFI Legacy"
    assert by_field["DefaultPartitionTable"].argument == "1"
    assert by_field["supportedProducts"].argument == "array"


def test_supported_products_item_paths() -> None:
    data = body(supportedProducts=["ok", "bad item", 5, "p" * 257, None, "also.ok"])
    assert pairs(problems(data)) == [
        ("supportedProducts[1]", "pattern"),
        ("supportedProducts[2]", "type"),
        ("supportedProducts[3]", "max"),
        ("supportedProducts[4]", "type"),
    ]


def test_supported_products_duplicates_are_dropped_in_order() -> None:
    out: list[ValidationDetail] = []
    spec = read_image_create(body(supportedProducts=["b", "a", "b", "c", "a"]), out)
    assert spec is not None and spec.supportedProducts == ["b", "a", "c"]


def partition(**changes: Any) -> dict[str, Any]:
    return {"name": "root", "mountPoint": "/", "size": "200G", "fileSystem": "ext4", **changes}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ([partition(size="")], [("DefaultPartitionTable[0].size", "required")]),
        ([partition(mountPoint="")], [("DefaultPartitionTable[0].mountPoint", "required")]),
        ([partition(fileSystem="")], [("DefaultPartitionTable[0].fileSystem", "required")]),
        ([partition(name="")], [("DefaultPartitionTable[0].name", "pattern")]),
        ([partition(name="bad/name")], [("DefaultPartitionTable[0].name", "pattern")]),
        ([partition(name="n" * 256)], [("DefaultPartitionTable[0].name", "max")]),
        ([partition(size="s" * 257)], [("DefaultPartitionTable[0].size", "max")]),
        ([partition(fileSystem="f" * 257)], [("DefaultPartitionTable[0].fileSystem", "max")]),
        ([partition(mountPoint="/" * 1025)], [("DefaultPartitionTable[0].mountPoint", "max")]),
        ([partition(size=200)], [("DefaultPartitionTable[0].size", "type")]),
        ([partition(), "root"], [("DefaultPartitionTable[1]", "type")]),
        ([None], [("DefaultPartitionTable[0]", "type")]),
        (
            [{"name": "root"}],
            [
                ("DefaultPartitionTable[0].mountPoint", "required"),
                ("DefaultPartitionTable[0].size", "required"),
                ("DefaultPartitionTable[0].fileSystem", "required"),
            ],
        ),
        (
            [partition(), partition(size=""), partition(name="-", fileSystem=None)],
            [
                ("DefaultPartitionTable[1].size", "required"),
                ("DefaultPartitionTable[2].name", "pattern"),
                ("DefaultPartitionTable[2].fileSystem", "required"),
            ],
        ),
    ],
)
def test_partition_field_paths(table: list[Any], expected: list[tuple[str, str]]) -> None:
    assert pairs(problems(body(DefaultPartitionTable=table))) == expected


def test_partition_boundaries_are_accepted() -> None:
    table = [partition(name="n" * 255, mountPoint="/" * 1024, size="s" * 256, fileSystem="f" * 256)]
    assert problems(body(DefaultPartitionTable=table)) == []


def test_prefix_is_applied_to_nested_paths() -> None:
    data = body(idc="", DefaultPartitionTable=[partition(size="")], supportedProducts=["a b"])
    assert [d.field for d in problems(data, "[7].")] == [
        "[7].idc",
        "[7].DefaultPartitionTable[0].size",
        "[7].supportedProducts[0]",
    ]


@pytest.mark.parametrize("data", [[], [VALID], "text", 5, None, True])
def test_non_object_body(data: Any) -> None:
    details = problems(data)
    assert pairs(details) == [("body", "type")]
    assert details[0].argument == "object"
    assert pairs(problems(data, "[3].")) == [("[3]", "type")]


@pytest.mark.parametrize("name", ["idc", "name", "path", "OSSeries", "icon", "orgId", "BootMode"])
def test_nul_characters_are_rejected(name: str) -> None:
    details = problems(body(**{name: "a\x00b"}))
    assert pairs(details) == [(name, "printable")]


def test_nul_characters_in_partitions_are_rejected() -> None:
    table = [partition(mountPoint="/\x00")]
    assert pairs(problems(body(DefaultPartitionTable=table))) == [
        ("DefaultPartitionTable[0].mountPoint", "printable")
    ]


def test_original_value_is_bounded_and_a_string() -> None:
    details = problems(
        body(
            idc="x" * 100_000,
            name={"nested": ["x" * 10_000]},
            path=["a"] * 5000,
            OSSeries=12345,
            BootMode="B" * 10_000,
        )
    )
    by_field = {d.field: d for d in details}
    assert by_field["idc"].originalValue == "x" * 256 + "…"
    assert by_field["name"].originalValue.startswith('{"nested":["xxx')
    assert by_field["OSSeries"].originalValue == "12345"
    assert all(len(d.originalValue) <= ORIGINAL_MAX for d in details)


def test_original_of_values_json_cannot_encode() -> None:
    text = original({1.5: object()})
    assert isinstance(text, str) and len(text) <= ORIGINAL_MAX
    assert original(None) == "" and original("") == "" and original(False) == "false"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200)
@given(
    replacements=st.dictionaries(
        st.sampled_from([*REQUIRED, "DefaultPartitionTable", "type"]), json_values, max_size=5
    ),
    drop=st.sets(st.sampled_from(REQUIRED), max_size=3),
)
def test_arbitrary_bodies_never_crash_and_details_are_well_formed(
    replacements: dict[str, Any], drop: set[str]
) -> None:
    data = body(**replacements)
    for name in drop:
        data.pop(name, None)
    details = problems(data)  # checks: result exactly when no details; originalValue str and bounded
    fields = [d.field for d in details]
    assert len(fields) == len(set(fields)), "one detail per offending field"
    for name in drop:
        assert (name, "required") in pairs(details)
    for d in details:
        top = d.field.split("[")[0].split(".")[0]
        assert top in REQUIRED


# --------------------------------------------------------------------------------- read_catalog_entries


def catalog_error(data: Any) -> Invalid:
    with pytest.raises(Invalid) as caught:
        read_catalog_entries(data)
    for item in caught.value.details:
        assert isinstance(item.originalValue, str) and len(item.originalValue) <= ORIGINAL_MAX
    return caught.value


def test_catalog_type_defaults_to_public_and_optional_fields_to_none() -> None:
    (entry,) = read_catalog_entries([body()])
    assert entry.type is ImageType.PUBLIC and entry.id is None and entry.created_at is None
    assert entry.spec.name == "Ubuntu-22.04"


def test_catalog_entry_fields_are_read() -> None:
    image_uuid = "A7E1B367-3DB0-5A6A-AA1C-74C7B7CEF6E9"
    first, second = read_catalog_entries(
        [
            body(type="Customized", id=image_uuid, createdAt="2026-01-15T09:00:00Z"),
            body(type="Public", id=None, createdAt=None, name="Other"),
        ]
    )
    assert first.type is ImageType.CUSTOMIZED
    assert first.id == uuid.UUID(image_uuid)
    assert first.created_at == dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC)
    assert second.type is ImageType.PUBLIC and second.id is None and second.created_at is None


def test_empty_catalog() -> None:
    assert read_catalog_entries([]) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-01-15T09:00:00Z", dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC)),
        ("2026-01-15T09:00:00.123456Z", dt.datetime(2026, 1, 15, 9, 0, 0, 123456, tzinfo=dt.UTC)),
        ("2026-01-15T14:30:00+05:30", dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC)),
        ("2026-01-15T01:00:00-08:00", dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC)),
    ],
)
def test_created_at_strings_are_converted_to_utc(value: str, expected: dt.datetime) -> None:
    (entry,) = read_catalog_entries([body(createdAt=value)])
    assert entry.created_at == expected
    assert entry.created_at is not None and entry.created_at.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-15T09:00:00Z", dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC)),
        ("2026-01-15 09:00:00Z", dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC)),
        ("2026-01-15T14:30:00+05:30", dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC)),
    ],
)
def test_created_at_yaml_datetimes_are_accepted(text: str, expected: dt.datetime) -> None:
    loaded = yaml.safe_load(f"createdAt: {text}")
    assert isinstance(loaded["createdAt"], dt.datetime)  # YAML made the datetime itself
    (entry,) = read_catalog_entries([body(**loaded)])
    assert entry.created_at == expected
    assert entry.created_at is not None and entry.created_at.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "value",
    [
        yaml.safe_load("v: 2026-01-15 09:00:00")["v"],  # a timezone-less YAML datetime
        yaml.safe_load("v: 2026-01-15")["v"],  # a YAML date
        dt.datetime(2026, 1, 15, 9),
        "2026-01-15T09:00:00",
        "2026-01-15",
        "yesterday",
        "",
        1768467600,
        1.5,
        True,
        ["2026-01-15T09:00:00Z"],
    ],
)
def test_created_at_without_offset_or_not_a_date_time_is_rejected(value: Any) -> None:
    error = catalog_error([body(createdAt=value)])
    assert pairs(error.details) == [("[0].createdAt", "datetime")]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"type": "public"}, [("[0].type", "oneof")]),
        ({"type": "Private"}, [("[0].type", "oneof")]),
        ({"type": 1}, [("[0].type", "type")]),
        ({"id": "not-a-uuid"}, [("[0].id", "uuid")]),
        ({"id": 42}, [("[0].id", "type")]),
        ({"id": "a7e1b3673db05a6aaa1c74c7b7cef6e9"}, [("[0].id", "uuid")]),
    ],
)
def test_catalog_optional_fields_are_validated(
    changes: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    assert pairs(catalog_error([body(**changes)]).details) == expected


def test_catalog_errors_are_reported_for_every_entry() -> None:
    entries = [
        body(idc="bad idc", id="nope"),
        body(name="fine"),
        "not an object",
        body(DefaultPartitionTable=[partition(size="")], createdAt="2026-01-15", type="x"),
        {"name": "only a name"},
    ]
    error = catalog_error(entries)
    assert str(error) == "Invalid catalog file."
    found = pairs(error.details)
    assert found[:4] == [
        ("[0].idc", "pattern"),
        ("[0].id", "uuid"),
        ("[2]", "type"),
        ("[3].DefaultPartitionTable[0].size", "required"),
    ]
    assert ("[3].type", "oneof") in found and ("[3].createdAt", "datetime") in found
    assert ("[4].idc", "required") in found and ("[4].icon", "required") in found
    assert ("[4].name", "required") not in found
    assert not any(field.startswith("[1]") for field, _ in found)
    assert all(field.startswith("[") for field, _ in found)


@pytest.mark.parametrize("data", [None, {"images": []}, "text", 5, {}])
def test_catalog_must_be_a_list(data: Any) -> None:
    error = catalog_error(data)
    assert pairs(error.details) == [("catalog", "type")]
    assert error.details[0].argument == "array"
