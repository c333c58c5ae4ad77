"""One replica's change polls, shared by its workers.

Every worker keeps its read model fresh by asking the database for the catalog's revision every
CE_POLL_INTERVAL, and for the changes when there are some. A fleet of many workers on one PostgreSQL (or
one PgBouncer) pays that per worker, for nothing: the workers of one ``serve`` all want the same answers.
The board is memory that ``serve`` maps before Granian forks its workers, so every worker of the replica
(respawned ones included) sees the same bytes:

- **the revision record**: a worker that asked the database writes what it learned, "at time T
  (``time.monotonic()``, one clock for every process of the machine, read before the question), the
  catalog's revision was at most R". Another worker that holds revision R exactly may count itself
  confirmed as of T, as if it had asked itself; one that holds less knows there is something new.
- **change records**, one region per worker, written only by that worker: the changes it fetched, from
  revision S (excluded) to R, and when R was confirmed. A worker behind the revision record applies
  records that start at or before its own cursor instead of asking the database for the same rows.

No lock is taken to read or write a record: each carries a check word (a hash of all its bytes), so a
record torn by a concurrent write reads as no record, and a worker that finds none asks the database
itself. An older revision record written over a newer one is still true, only less useful. Only claiming
a region (once per worker, at its start) takes a lock, with a timeout: a worker that gets none still
reads the others' records.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import struct

import msgspec
import xxhash

from ..storage.records import Changes, Stored

_REVISION = struct.Struct("<qdQ")  # revision, confirmed at (time.monotonic()), check word
_HEADER_BYTES = 4096  # the revision record's page
REGIONS = 64  # change regions, one per worker: serve's --workers is at most 64
REGION_BYTES = 256 * 1024  # a change record larger than this is not shared (its readers ask the database)
_REGION = struct.Struct("<qqqdqQ")  # owner pid, since, upto, confirmed at, payload length, check word
_PAYLOAD = tuple[list[Stored], list[tuple[str, int]]]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_PAYLOAD).decode


class RevisionBoard:
    """The revision record and the change regions, in memory shared by the processes forked after it."""

    def __init__(self, regions: int = REGIONS) -> None:
        self.regions = regions
        # anonymous and MAP_SHARED: forked children share it; pages are only backed once written
        self._memory = mmap.mmap(-1, _HEADER_BYTES + regions * REGION_BYTES)
        self._claiming = multiprocessing.get_context("fork").Lock()

    # --------------------------------------------------------------------------------- the revision

    def publish(self, revision: int, at: float) -> None:
        """Record that at ``at`` the database's revision was at most ``revision``."""
        self._memory[: _REVISION.size] = _REVISION.pack(
            revision, at, _checked(_REVISION.pack(revision, at, 0))
        )

    def read(self) -> tuple[int, float] | None:
        """The last revision record published, or None (nothing yet, or a record caught mid-write)."""
        revision, at, check = _REVISION.unpack_from(self._memory)
        valid = check == _checked(_REVISION.pack(revision, at, 0))
        return (revision, at) if valid else None  # a zeroed record (nothing published yet) fails too

    # ---------------------------------------------------------------------------- change records

    def claim_region(self) -> int | None:
        """A region for this process's change records: a free one, or one whose owner is gone."""
        if not self._claiming.acquire(timeout=1.0):
            return None
        try:
            for index in range(self.regions):
                (owner,) = struct.unpack_from("<q", self._memory, self._offset(index))
                if owner == 0 or not _alive(owner):
                    self._memory[self._offset(index) : self._offset(index) + _REGION.size] = _REGION.pack(
                        os.getpid(), 0, 0, 0.0, 0, 0
                    )
                    return index
            return None
        finally:
            self._claiming.release()

    def share_changes(self, region: int, since: int, changes: Changes, at: float) -> bool:
        """Write the changes a poll fetched (revisions ``since`` excluded to ``changes.revision``) to
        ``region``; False when they are too large to share."""
        payload = _encode((changes.upserted, changes.deleted))
        if _REGION.size + len(payload) > REGION_BYTES:
            return False
        offset = self._offset(region)
        fields = (os.getpid(), since, changes.revision, at, len(payload))
        check = _region_check(fields, payload)
        start = offset + _REGION.size
        self._memory[offset : offset + _REGION.size] = _REGION.pack(*fields[:4], -1, 0)  # being written
        self._memory[start : start + len(payload)] = payload
        self._memory[offset : offset + _REGION.size] = _REGION.pack(*fields, check)
        return True

    def changes_from(self, cursor: int) -> tuple[Changes, float] | None:
        """The shared changes that reach furthest from ``cursor`` (a record that starts at or before it
        and ends after it), with the time their last revision was confirmed; None when none does."""
        best: tuple[Changes, float] | None = None
        for index in range(self.regions):
            offset = self._offset(index)
            owner, since, upto, at, length, check = _REGION.unpack_from(self._memory, offset)
            if owner == 0 or length < 0 or not since <= cursor < upto:
                continue
            if best is not None and upto <= best[0].revision:
                continue
            start = offset + _REGION.size
            if length > REGION_BYTES - _REGION.size:
                continue
            payload = self._memory[start : start + length]
            if check != _region_check((owner, since, upto, at, length), payload):
                continue  # torn: being rewritten
            with contextlib.suppress(msgspec.DecodeError):
                upserted, deleted = _decode(payload)
                best = Changes(revision=upto, upserted=upserted, deleted=deleted), at
        return best

    def _offset(self, region: int) -> int:
        return _HEADER_BYTES + region * REGION_BYTES


def _checked(*parts: bytes) -> int:
    """The check word of a record's bytes (with its own check word zeroed): xxh3, plus one so that a
    zeroed record, which is what an unwritten page holds, never passes."""
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    return (hasher.intdigest() + 1) & 0xFFFF_FFFF_FFFF_FFFF


def _region_check(fields: tuple[int, int, int, float, int], payload: bytes) -> int:
    return _checked(struct.pack("<qqqdq", *fields), payload)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_for_workers: RevisionBoard | None = None


def share_with_workers() -> None:
    """Called by ``serve`` before Granian forks several workers: each of them finds the board."""
    global _for_workers
    _for_workers = RevisionBoard()


def inherited() -> RevisionBoard | None:
    """The board of this replica's workers; None in a process that no multi-worker ``serve`` forked
    (one worker, the ASGI app in tests, another server), which then polls the database itself."""
    return _for_workers
