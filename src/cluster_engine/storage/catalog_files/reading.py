"""Reading a catalog file as a stream of entries: JSON a block at a time (msgspec, then ijson), YAML whole."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec
import yaml

from ...rules.catalog_entries import CatalogFields, entry_of_fields, not_a_catalog
from .shared import CatalogFileError

if TYPE_CHECKING:
    pass

# A file that starts like JSON but is not JSON may be YAML in flow style: read again as YAML when it is at
# most this big (YAML is read whole, and a truncated JSON file of millions of images must not be).
YAML_RETRY_BYTES = 32 * 1024 * 1024


class _NotJson(Exception):
    pass


class _Recorder:
    """A binary reader that hands out ``head`` and then the file, and keeps what it handed out while that
    is at most ``YAML_RETRY_BYTES``: a file that turns out not to be JSON can then be read again as YAML,
    also from a pipe."""

    def __init__(self, raw: BinaryIO, head: bytes) -> None:
        self.raw, self.head = raw, head
        self.kept: list[bytes] | None = []
        self.kept_bytes = 0
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson asks for nothing first, to see whether it reads bytes or text
            return b""
        if self.head:
            cut = len(self.head) if size < 0 else size
            data, self.head = self.head[:cut], self.head[cut:]
        else:
            data = self.raw.read(size)
        self.position += len(data)
        if self.kept is not None and data:
            self.kept_bytes += len(data)
            if self.kept_bytes > YAML_RETRY_BYTES:
                self.kept = None
            else:
                self.kept.append(data)
        return data

    def whole(self) -> bytes | None:
        """The whole file, when what was read of it so far was kept and all of it is small enough."""
        if self.kept is None:
            return None
        parts = [*self.kept, self.head]
        size = self.kept_bytes + len(self.head)
        while size <= YAML_RETRY_BYTES and (data := self.raw.read(YAML_RETRY_BYTES + 1 - size)):
            parts.append(data)
            size += len(data)
        return b"".join(parts) if size <= YAML_RETRY_BYTES else None


def _decode_whole(data: bytes, name: str, *, try_json: bool = True) -> Any:
    """A whole file: JSON through msgspec when it looks like JSON, anything else as YAML (as before)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogFileError(f"{name}: not valid YAML or JSON: {exc}") from None
    if try_json and text.lstrip()[:1] in ("[", "{"):
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError:
            pass  # YAML flow style can look like JSON; let the YAML parser judge it
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it
    try:
        return yaml.load(text, Loader=loader)  # a safe loader either way
    except yaml.YAMLError as exc:
        raise CatalogFileError(f"{name}: not valid YAML or JSON: {exc}") from None


class CatalogSource:
    """The raw entries of a catalog file (``items``) and how far reading has got (``position`` of
    ``size`` bytes). A file whose first character is ``[`` is parsed as a stream of JSON values; anything
    else is read whole (YAML, or a JSON object: no catalog). Raises CatalogFileError when the file is read
    whole and is neither."""

    def __init__(self, file: BinaryIO, name: str, *, whole: bytes | None = None) -> None:
        self.name = name
        self.size: int | None = None
        self.reader: _Recorder | None = None
        if whole is not None:  # a file that turned out not to be JSON, read again as YAML
            self.size = len(whole)
            self.data = _decode_whole(whole, name, try_json=False)
            return
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            self.size = _file_size(file)
        head = b""
        while not head.lstrip():
            chunk = file.read(65536)
            if not chunk:
                break
            head += chunk
        if head.lstrip()[:1] == b"[":
            self.reader = _Recorder(file, head)
            self.data = None
        else:
            self.data = _decode_whole(head + file.read(), name)

    @property
    def position(self) -> int:
        return self.reader.position if self.reader is not None else 0

    def items(self) -> Iterator[Any]:
        """The file's entries: raw (decoded JSON or YAML), or already CatalogEntry when a JSON entry passed
        every check as it was decoded."""
        if self.reader is None:
            if not isinstance(self.data, list):
                raise not_a_catalog(self.data)
            yield from self.data
            return
        yield from _json_entries(self.reader)

    def as_yaml(self, problem: _NotJson) -> CatalogSource:
        """After ``items`` found that the file is not JSON: the same file, read whole as YAML."""
        data = self.reader.whole() if self.reader is not None else None
        if data is None:
            position = self.reader.position if self.reader is not None else 0
            raise CatalogFileError(
                f"{self.name}: not valid YAML or JSON: {problem} (near byte {position:,}; a file over "
                f"{YAML_RETRY_BYTES >> 20} MiB that starts with '[' is read as JSON only)"
            )
        return CatalogSource(io.BytesIO(), self.name, whole=data)


# Where a JSON array's entries may end: a "}" and the comma before the next "{". Only a cut at the end of a
# whole top-level entry makes "[" + what precedes it + "]" decode (a cut inside a string leaves it open, one
# inside a nested value leaves its brackets open), so decoding proves the cut right.
_CUT = re.compile(rb"\}\s*,\s*(?=\{)")
_CUT_TRIES = 8
_CUT_TAIL = 1 << 15
JSON_BLOCK = 1 << 18
JSON_PENDING_MAX = 64 << 20  # no cut found in this much: ijson reads the rest
_typed_decoder = msgspec.json.Decoder(list[CatalogFields])
_raw_decoder = msgspec.json.Decoder()


def _decode_segment(data: bytes) -> list[Any] | None:
    """The entries of a JSON array (typed when they all type-check), or None when ``data`` is no array."""
    try:
        return _typed_decoder.decode(data)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError:
        return None
    try:
        return list(_raw_decoder.decode(data))
    except msgspec.DecodeError:
        return None


def _json_entries(reader: _Recorder) -> Iterator[Any]:
    """A JSON array's entries, a block (``JSON_BLOCK``) at a time: each block's whole entries are decoded by
    msgspec straight into typed fields and checked (``entry_of_fields``), in a fraction of what a parser
    that builds every object in Python costs; what does not pass is handed on raw, for the checks to say
    why. Whatever this cannot cut into blocks goes to ijson, which also names the first syntax error."""
    pending = b""
    while not pending.strip() and (chunk := reader.read(JSON_BLOCK)):
        pending += chunk
    pending = pending.lstrip()[1:]  # after the "["
    after_comma = False
    while True:
        searched = max(0, len(pending) - 64)
        block = reader.read(JSON_BLOCK)
        if not block:  # the last entries and the "]"
            if after_comma and pending.lstrip()[:1] == b"]":
                raise _NotJson("parse error: a comma before the closing ']'")
            entries = _decode_segment(b"[" + pending)
            if entries is None:
                yield from _ijson_entries(b"[" + pending, reader)
                return
            yield from _checked(entries, b"[" + pending)
            return
        pending += block
        for cut in _cuts(pending, searched):
            segment = b"[" + pending[: cut.start() + 1] + b"]"
            entries = _decode_segment(segment)
            if entries is not None:
                yield from _checked(entries, segment)
                pending, after_comma = pending[cut.end() :], True
                break
        else:
            if len(pending) > JSON_PENDING_MAX:
                yield from _ijson_entries(b"[" + pending, reader)
                return


def _cuts(pending: bytes, searched: int) -> list[re.Match[bytes]]:
    """The cuts to try (any that decodes is right), best first: the last ones after ``searched``, those at
    a line's end (as in generated files, one entry a line: right almost always) before the others. Looked
    for in the last ``_CUT_TAIL`` bytes first (not in the whole block: that costs a tenth of reading)."""
    tail = max(searched, len(pending) - _CUT_TAIL)
    cuts = list(_CUT.finditer(pending, tail))
    if len(cuts) < _CUT_TRIES and tail > searched:
        cuts = list(_CUT.finditer(pending, searched))
    lines = [cut for cut in cuts if b"\n" in cut.group()]
    others = [cut for cut in cuts if b"\n" not in cut.group()]
    return [*reversed(lines), *reversed(others)][:_CUT_TRIES]


def _checked(entries: list[Any], segment: bytes) -> Iterator[Any]:
    raw: list[Any] | None = None
    for position, entry in enumerate(entries):
        if type(entry) is not CatalogFields:
            yield entry
            continue
        checked = entry_of_fields(entry)
        if checked is None:  # the checks say why on the entry as decoded
            raw = raw if raw is not None else _raw_decoder.decode(segment)
            yield raw[position]
        else:
            yield checked


class _Prefixed:
    def __init__(self, head: bytes, rest: _Recorder) -> None:
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        if self.head:
            data, self.head = self.head, b""
            return data
        return self.rest.read(size)


def _ijson_entries(head: bytes, rest: _Recorder) -> Iterator[Any]:
    import ijson

    try:
        yield from ijson.items(_Prefixed(head, rest), "item", use_float=True)
    except ijson.JSONError as exc:
        message = str(exc).strip().splitlines()
        raise _NotJson(message[0] if message else type(exc).__name__) from None


def _file_size(file: BinaryIO) -> int | None:
    import os
    import stat

    info = os.fstat(file.fileno())
    return info.st_size if stat.S_ISREG(info.st_mode) else None
