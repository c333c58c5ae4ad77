"""Atheris (coverage-guided, libFuzzer) harnesses for the code that reads untrusted input: the list query,
image ids, request bodies (create, merge patch, catalog entries) and bearer tokens.

Run one (``drills/fuzz.py`` does, each in its own process, for a bounded time)::

    python -m drills.fuzz_targets TARGET [libFuzzer flags] [CORPUS_DIR …]  # a new/empty CORPUS_DIR: seeds
    python -m drills.fuzz_targets TARGET --seeds DIR      # write the seed corpus (valid inputs) into DIR
    python -m drills.fuzz_targets TARGET --replay FILE …  # run inputs once, uncaught, and show tracebacks

The first byte of an input picks a mode (how the rest is read); the seeds are valid inputs of each mode.
An ``ApiError`` (what the service turns into a 4xx) is an expected outcome, and its body must encode; any
other exception, or a broken invariant (``AssertionError``), is a crash. Crashes do not stop the run:
the first input of each distinct crash (exception type and innermost frame) is written to
``$CE_FUZZ_CRASH_DIR`` as ``crash-TARGET-N.bin`` with its traceback in ``crash-TARGET-N.txt``, and
fuzzing goes on, so one known bug does not hide the next. Native crashes, timeouts and out-of-memory
inputs are libFuzzer's own artifacts (``-artifact_prefix``).

Instrumented for coverage: ``cluster_engine`` (and PyJWT, for the token target).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import sys
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["cluster_engine", "jwt"]):
    import jwt

    from cluster_engine.invalid import Invalid
    from cluster_engine.rules import catalog_entries
    from cluster_engine.schemas import json_encoder
    from cluster_engine.server import bodies, reads, validation, writes
    from cluster_engine.server.auth import Verifier
    from cluster_engine.server.config import load_settings
    from cluster_engine.server.errors import ApiError, RequestInvalid, of_storage

from cluster_engine.testing.requests import BodyRequest

from .common import create_body as drill_body  # after the instrumented imports: it imports them too

SECRET = "fuzz-secret-" + "x" * 40  # HS256 key of the token target's verifiers
ISSUER, AUDIENCE = "https://issuer.example", "cluster-engine"
ORG = uuid.UUID("0b7e2f52-4c1a-4d52-9a57-2f1c3c2d9e01")
FAR_FUTURE = 4_102_444_800  # 2100-01-01
ORIGINAL_MAX = 257  # validation._ORIGINAL_VALUE_MAX plus the ellipsis
DEEP = 900  # nesting of the deepest seed bodies (Python's recursion limit is 1000)

_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ------------------------------------------------------------------------------------ valid inputs


def create_body(name: str = "fuzz-image") -> dict[str, Any]:
    return drill_body(ORG, name=name)


def current_image() -> dict[str, Any]:
    """An image as ``read_patch`` gets it (``msgspec.to_builtins`` of an ImageResp)."""
    return {
        "id": "5b0f4d5e-8d7a-4c3e-9a65-2f7e1f0d9c11",
        "type": "Customized",
        "createdAt": "2025-01-02T03:04:05.123456Z",
        **create_body(),
    }


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signed(header: bytes, payload: bytes, secret: str = SECRET) -> bytes:
    """A JWS compact token over exactly these header and payload bytes, with a valid HS256 signature."""
    signing_input = _b64(header) + b"." + _b64(payload)
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return signing_input + b"." + _b64(signature)


# ------------------------------------------------------------------------- structured data from bytes


def _text(fdp: atheris.FuzzedDataProvider, limit: int = 40) -> str:
    """A string the way the service can receive one: no lone surrogates (decoders replace those)."""
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit)))


def _json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """Any JSON value (what ``msgspec.json.decode`` can give a validator)."""
    kind = fdp.ConsumeIntInRange(0, 10 if depth == 0 else 9 if depth < 4 else 5)
    if kind == 10:  # nested about as deep as a decoder allows (what a JSON or YAML document can give)
        value: Any = _json_value(fdp, 4)
        for _ in range(fdp.ConsumeIntInRange(0, 2 * DEEP)):
            value = [value] if fdp.ConsumeBool() else {"x": value}
        return value
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))
    if kind == 3:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind in (4, 5):
        return _text(fdp)
    if kind in (6, 7):
        return [_json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {_text(fdp, 12): _json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))}


_FIELDS = [*create_body(), "type", "id", "createdAt", "DefaultPartitionTable[]", "supportedProducts[]"]
_PARTITION_FIELDS = ["name", "mountPoint", "size", "fileSystem"]


def _mutated_body(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    """A valid create body with a few fields replaced by arbitrary values, or removed."""
    body: dict[str, Any] = json.loads(json.dumps(create_body()))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        field = fdp.PickValueInList(_FIELDS)
        action = fdp.ConsumeIntInRange(0, 3)
        if field == "DefaultPartitionTable[]":
            table = body.get("DefaultPartitionTable")
            if isinstance(table, list) and table:
                index = fdp.ConsumeIntInRange(0, len(table) - 1)
                if isinstance(table[index], dict):
                    name = fdp.PickValueInList(_PARTITION_FIELDS)
                    if action == 0:
                        table[index].pop(name, None)
                    else:
                        table[index][name] = _text(fdp) if action == 1 else _json_value(fdp)
                else:
                    table[index] = _json_value(fdp)
        elif field == "supportedProducts[]":
            products = body.get("supportedProducts")
            if isinstance(products, list):
                products.append(_text(fdp) if action < 2 else _json_value(fdp))
        elif action == 0:
            body.pop(field, None)
        else:
            body[field] = _text(fdp, 300) if action == 1 else _json_value(fdp)
    return body


def _run_sync(coroutine: Any) -> Any:
    """Run a coroutine that never suspends (its awaits complete at once) without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("the coroutine suspended")


def _request_body(data: bytes) -> Any:
    """The body as the service decodes it (``RequestInvalid`` when it is not JSON)."""
    return _run_sync(writes.read_json(BodyRequest(data)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- invariants


def _check_details(error: RequestInvalid) -> None:
    assert error.details, "RequestInvalid without validationDetail"
    for item in error.details:
        assert len(item.originalValue) <= ORIGINAL_MAX, f"originalValue of {len(item.originalValue)} chars"


def _check_query(query: validation.ListQuery) -> None:
    for value, regex, limit in (
        (query.idc, validation._IDC_RE, validation.IDC_MAX),
        (query.product, validation._PRODUCT_RE, validation.PRODUCT_MAX),
    ):
        assert value is None or (len(value) <= limit and regex.fullmatch(value)), value
    assert query.limit is None or 1 <= query.limit <= validation.LIMIT_MAX, query.limit
    if query.after is not None:
        assert validation._decode_cursor(validation.encode_cursor(query.after)) == query.after, query.after


def _check_spec(spec: Any) -> None:
    """An accepted spec is one the service can store and serve."""
    json_encoder.encode(spec)
    assert validation._IDC_RE.fullmatch(spec.idc) and len(spec.idc) <= validation.IDC_MAX, spec.idc
    assert validation._NAME_RE.fullmatch(spec.name), spec.name
    assert spec.DefaultPartitionTable, "an empty partition table was accepted"
    assert validation.is_uri(spec.icon), spec.icon
    for value in (spec.path, spec.OSSeries, spec.OSVersion, spec.SystemDiskSize, spec.name):
        assert "\x00" not in value, "NUL accepted"


# -------------------------------------------------------------------------------------------- targets


_LIST = reads.ListQueries()


def query_target(data: bytes) -> None:
    """Mode 0: the rest is a raw query string, read the way ``GET /v1/images`` reads it (``parse_qsl`` of
    the latin-1 text, then ``list_query``). Mode 1: a parameter mapping built by FuzzedDataProvider
    (known and unknown names, repeated values, any text) straight into ``list_query``."""
    if not data:
        return
    if data[0] % 2 == 0:
        _LIST._queries.clear()  # its cache would otherwise answer repeated inputs without validating
        query = _LIST._query(data[1:])
    else:
        fdp = atheris.FuzzedDataProvider(data[1:])
        names = ["idc", "product", "limit", "cursor"]
        params: dict[str, list[str]] = {}
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            name = fdp.PickValueInList(names) if fdp.ConsumeIntInRange(0, 5) else _text(fdp, 8)
            for _ in range(fdp.ConsumeIntInRange(1, 3) if fdp.ConsumeIntInRange(0, 3) == 0 else 1):
                if name == "cursor" and fdp.ConsumeBool():
                    value = validation.encode_cursor((_text(fdp, 30), _text(fdp, 40)))
                else:
                    value = _text(fdp, 300)
                params.setdefault(name, []).append(value)
        query = validation.list_query(params)
    _check_query(query)


def image_id_target(data: bytes) -> None:
    """A path segment as the server hands it over (UTF-8, invalid bytes replaced): ``image_id`` and
    ``parse_uuid`` agree, and accept exactly the canonical 8-4-4-4-12 form in either case."""
    raw = data.decode("utf-8", errors="replace")
    parsed = validation.parse_uuid(raw)
    canonical = _UUID_TEXT.fullmatch(raw.lower()) is not None
    assert (parsed is not None) == canonical, (raw, parsed)
    if parsed is not None:
        assert str(parsed) == raw.lower()
    try:
        value = validation.image_id(raw)
    except RequestInvalid as error:
        assert parsed is None, raw
        _check_details(error)
        raise
    assert value == parsed, (raw, value)


def bodies_target(data: bytes) -> None:
    """Mode 0: the rest is a ``POST /v1/images`` body (bytes, decoded as the service does) for
    ``read_create_request``. Mode 1: a ``PATCH`` body for ``read_patch`` of a stored image. Mode 2: a valid
    create body with fields mutated by FuzzedDataProvider, through ``read_create_request``, ``read_patch``
    (as a patch) and ``read_catalog_entries`` (as a catalog entry)."""
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        spec, _type = bodies.read_create_request(_request_body(rest))
        _check_spec(spec)
    elif mode == 1:
        _check_spec(bodies.read_patch(current_image(), _request_body(rest)))
    else:
        fdp = atheris.FuzzedDataProvider(rest)
        body = _mutated_body(fdp)
        which = fdp.ConsumeIntInRange(0, 2)
        if which == 0:
            spec, _type = bodies.read_create_request(body)
            _check_spec(spec)
        elif which == 1:
            _check_spec(bodies.read_patch(current_image(), body))
        else:
            try:
                entries = catalog_entries.read_catalog_entries([body])
            except Invalid as invalid:  # what the service answers it with (a 400)
                raise of_storage(invalid) from None
            for entry in entries:
                _check_spec(entry.spec)


_VERIFIERS: list[Verifier] = []


def _verifiers() -> list[Verifier]:
    if not _VERIFIERS:
        data_dir = os.environ.get("CE_FUZZ_WORKDIR") or "/nonexistent-cluster-engine-fuzz"
        base = {"CE_DATA_DIR": data_dir, "CE_JWT_SECRET": SECRET}
        strict = {**base, "CE_JWT_ISSUER": ISSUER, "CE_JWT_AUDIENCE": AUDIENCE, "CE_JWT_LEEWAY": "30"}
        _VERIFIERS.extend(Verifier(load_settings(env)) for env in (base, strict))
    return _VERIFIERS


def token_target(data: bytes) -> None:
    """``Verifier.authenticate`` with an HS256 secret (one verifier plain, one requiring iss/aud with
    leeway; bit 1 of the first byte picks). Mode 0: the rest is the raw ``Authorization`` header. Mode 1:
    the rest is ``header JSON \\0 payload JSON``, made into ``Bearer`` + a token over exactly those bytes
    with a valid signature, so that the claims themselves are fuzzed. A token that verifies has a UUID org
    and string scopes, and verifies again (from the cache) to the same principal."""
    if not data:
        return
    verifier = _verifiers()[(data[0] >> 1) % 2]
    if data[0] % 2 == 0:
        authorization = data[1:]
    else:
        header, _, payload = data[1:].partition(b"\x00")
        authorization = b"Bearer " + signed(header, payload)
    principal = verifier.authenticate(authorization)
    assert isinstance(principal.org_id, uuid.UUID) and principal.org == str(principal.org_id)
    assert all(isinstance(scope, str) and scope for scope in principal.scopes), principal.scopes
    assert verifier.authenticate(authorization) == principal


TARGETS: dict[str, Callable[[bytes], None]] = {
    "query": query_target,
    "image_id": image_id_target,
    "bodies": bodies_target,
    "token": token_target,
}


def seeds(target: str) -> list[bytes]:
    """Valid inputs (and a few near misses) to start each target's corpus from."""
    if target == "query":
        cursor = validation.encode_cursor(("2025-01-02T03:04:05.123456", str(ORG)))
        queries = [
            "",
            "idc=us-west-1",
            "product=gpu.h100.8x",
            "idc=us-west-1&product=gpu.h100.8x",
            "limit=10",
            f"limit=2&cursor={cursor}",
            f"idc=eu-central-1&product=gpu.b200.8x&limit=1000&cursor={cursor}&other=1",
            "idc=a&idc=b",
            "idc=%E2%9C%93&product=",
        ]
        return [b"\x00" + q.encode() for q in queries] + [b"\x01" + bytes(range(64))]
    if target == "image_id":
        return [
            str(ORG).encode(),
            str(ORG).upper().encode(),
            b"{" + str(ORG).encode() + b"}",
            b"urn:uuid:" + str(ORG).encode(),
            ORG.hex.encode(),
            b"not-a-uuid",
        ]
    if target == "bodies":
        body = json.dumps(create_body()).encode()
        patches = [{"name": "renamed"}, {"supportedProducts": ["gpu.l40s.4x"]}, {"icon": None}, {"id": "x"}]
        return [
            b"\x00" + body,
            b"\x00" + json.dumps({**create_body(), "type": "Public"}).encode(),
            *(b"\x01" + json.dumps(patch).encode() for patch in patches),
            b"\x02" + bytes(range(128)),
            # near the nesting depth where decoders and recursive validators give up
            b"\x00" + b"[" * DEEP + b"]" * DEEP,
            b"\x01" + b'{"name":' * DEEP + b"1" + b"}" * DEEP,
        ]
    if target == "token":
        header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
        claims = {"orgId": str(ORG), "exp": FAR_FUTURE, "scope": "images:write images:admin", "sub": "fuzz"}
        strict_claims = {**claims, "iss": ISSUER, "aud": AUDIENCE, "nbf": 0, "iat": 1}
        plain = json.dumps(claims).encode()
        strict = json.dumps(strict_claims).encode()
        return [
            b"\x00Bearer " + signed(header, plain),
            b"\x02Bearer " + signed(header, strict),
            b"\x00bearer  " + signed(header, plain) + b" ",
            b"\x00Basic dXNlcjpwYXNz",
            b"\x01" + header + b"\x00" + plain,
            b"\x03" + header + b"\x00" + strict,
            b"\x01" + header + b"\x00" + json.dumps({**claims, "exp": 1}).encode(),
            b"\x00Bearer " + jwt.encode(claims, "another-secret-" + "y" * 40, algorithm="HS256").encode(),
        ]
    raise KeyError(target)


# ------------------------------------------------------------------------------------------- running


class _Crashes:
    """Records the first input of each distinct crash of one target, and lets fuzzing go on."""

    def __init__(self, target: str, directory: Path | None) -> None:
        self.target, self.directory = target, directory
        self.seen: set[str] = set()

    def record(self, data: bytes, error: BaseException) -> None:
        frames = traceback.extract_tb(error.__traceback__)
        own = [f for f in frames if "cluster_engine" in f.filename] or frames
        where = f"{Path(own[-1].filename).name}:{own[-1].lineno}" if own else "?"
        signature = f"{type(error).__name__} at {where}"
        if signature in self.seen:
            return
        self.seen.add(signature)
        text = "".join(traceback.format_exception(error))
        print(f"\n=== fuzz crash [{self.target}] {signature}\n{text}", file=sys.stderr, flush=True)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            stem = self.directory / f"crash-{self.target}-{len(self.seen)}"
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text(f"{signature}\ninput: {data!r}\n\n{text}")


def guarded(target: str, crashes: _Crashes) -> Callable[[bytes], None]:
    function = TARGETS[target]

    def one_input(data: bytes) -> None:
        try:
            function(data)
        except ApiError as expected:
            try:
                expected.body()  # what the service would send must encode
                if isinstance(expected, RequestInvalid):
                    _check_details(expected)
            except Exception as error:
                crashes.record(data, error)
        except Exception as error:  # anything else escaping a validator is a 500 in the service
            crashes.record(data, error)

    return one_input


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m drills.fuzz_targets {{{','.join(TARGETS)}}} [libFuzzer flags] [CORPUS …]")
    target = argv[1]
    if argv[2:3] == ["--seeds"]:
        directory = Path(argv[3])
        directory.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds(target)):
            (directory / f"seed-{index}").write_bytes(seed)
        return
    if argv[2:3] == ["--replay"]:
        for path in argv[3:]:
            data = Path(path).read_bytes()
            try:
                TARGETS[target](data)
                print(f"{path}: passed")
            except ApiError as expected:
                expected.body()
                print(f"{path}: {type(expected).__name__} (expected)")
        return
    for argument in argv[2:]:  # corpus directories: an empty or new one starts from the seeds
        corpus = Path(argument)
        if not argument.startswith("-") and (not corpus.exists() or not any(corpus.iterdir())):
            corpus.mkdir(parents=True, exist_ok=True)
            for index, seed in enumerate(seeds(target)):
                (corpus / f"seed-{index}").write_bytes(seed)
    crash_dir = os.environ.get("CE_FUZZ_CRASH_DIR")
    crashes = _Crashes(target, Path(crash_dir) if crash_dir else None)
    atheris.Setup([argv[0], *argv[2:]], guarded(target, crashes))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
