"""The export: ``images.body`` in (created_at, id) order, written as JSON or YAML incrementally."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import msgspec
import sqlalchemy as sa
import yaml

from ...schemas import ImageType
from ..db import images
from .progress import QUIET, Progress

if TYPE_CHECKING:
    from ..store import Store


async def export_catalog(
    store: Store,
    out: BinaryIO,
    *,
    output: Literal["json", "yaml"],
    image_type: ImageType | None = None,
    progress: Progress = QUIET,
) -> int:
    """Write the catalog to ``out`` as a catalog file (the list of served images in (createdAt, id) order,
    of ``image_type`` only when given); the number of images written."""
    query = sa.select(images.c.body).order_by(images.c.created_at, images.c.id)
    count = sa.select(sa.func.count()).select_from(images)
    if image_type is not None:
        query = query.where(images.c.type == image_type.value)
        count = count.where(images.c.type == image_type.value)
    writer: _JsonList | _YamlList = _JsonList(out) if output == "json" else _YamlList(out)
    try:
        async with store.engine.connect() as conn:
            total = int(await conn.scalar(count) or 0) if progress.enabled else 0
            progress.phase("catalog export")
            result = await conn.stream(query.execution_options(yield_per=2000))
            async for rows in result.partitions():
                writer.write([bytes(row[0]) for row in rows])
                progress.update(f"{writer.count:,} of {total:,} images")
        writer.close()
    finally:
        progress.close()
    return writer.count


class _JsonList:
    """``json.dumps(images, indent=2)`` plus a newline, written image by image."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.count = out, 0

    def write(self, bodies: list[bytes]) -> None:
        parts = []
        for body in bodies:
            parts.append(b",\n" if self.count else b"[\n")
            parts.append(_json_item(body))
            self.count += 1
        self.out.write(b"".join(parts))

    def close(self) -> None:
        self.out.write(b"\n]\n" if self.count else b"[]\n")


def _json_item(body: bytes) -> bytes:
    """One image of the list, as ``json.dumps(…, indent=2)`` renders it inside the list."""
    if body.isascii() and b"\x7f" not in body:  # what json.dumps escapes (ensure_ascii) is not there
        text = msgspec.json.format(body, indent=2)
    else:
        text = json.dumps(json.loads(body), indent=2).encode()
    return b"  " + text.replace(b"\n", b"\n  ")


# Entries whose strings are printable ASCII (no escapes other than \" and \\ in the JSON) come out of
# libyaml's emitter exactly as out of PyYAML's (Python) one, which is what yaml.safe_dump uses; the rest
# go through PyYAML's.
_YAML_UNSAFE = re.compile(rb'[^\x20-\x7e]|\\[^"\\]')
_FAST_DUMPER: Any = getattr(yaml, "CSafeDumper", None)


class _YamlList:
    """``yaml.safe_dump(images, sort_keys=False, allow_unicode=True)``, written a batch at a time (the
    list's items are independent: a block list of N items is the N one-item lists one after another)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.count = out, 0

    def write(self, bodies: list[bytes]) -> None:
        run: list[Any] = []
        for body in bodies:
            entry = msgspec.json.decode(body)
            if _FAST_DUMPER is not None and not _YAML_UNSAFE.search(body):
                run.append(entry)
                continue
            self._dump(run, _FAST_DUMPER)
            run = []
            self._dump([entry], yaml.SafeDumper)
        self._dump(run, _FAST_DUMPER)
        self.count += len(bodies)

    def _dump(self, entries: list[Any], dumper: Any) -> None:
        if entries:
            text = yaml.dump(entries, Dumper=dumper, sort_keys=False, allow_unicode=True)
            self.out.write(text.encode("utf-8"))

    def close(self) -> None:
        if not self.count:
            self.out.write(b"[]\n")
