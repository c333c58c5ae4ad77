"""What the import's steps share: the namespace and identity digests, the messages, the file's problems."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ...invalid import Invalid
from ...schemas import ValidationDetail

if TYPE_CHECKING:
    pass


INVALID_FILE = "Invalid catalog file."
# Problems kept for the report; the rest are counted (a generated file that is wrong is wrong everywhere).
PROBLEMS_KEPT = 10_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


class CatalogFileError(Exception):
    """The file is neither JSON nor YAML; the message says why."""


class CatalogInvalid(Invalid):
    """The file's entries are invalid: the first ``PROBLEMS_KEPT`` problems, and how many more there are."""

    def __init__(self, details: Sequence[ValidationDetail], omitted: int = 0) -> None:
        super().__init__(details, message=INVALID_FILE)
        self.omitted = omitted


class _Problems:
    def __init__(self) -> None:
        self.kept: list[ValidationDetail] = []
        self.omitted = 0

    def __bool__(self) -> bool:
        return bool(self.kept)

    def add(self, problem: ValidationDetail) -> None:
        if len(self.kept) < PROBLEMS_KEPT:
            self.kept.append(problem)
        else:
            self.omitted += 1

    def extend(self, problems: Iterable[ValidationDetail]) -> None:
        for problem in problems:
            self.add(problem)

    def error(self) -> CatalogInvalid:
        return CatalogInvalid(self.kept, self.omitted)


def identity_key(namespace: str, idc: str, name: str) -> int:
    """A 128-bit digest of an image's identity: the index keeps this instead of three strings."""
    digest = hashlib.blake2b(f"{namespace}\x00{idc}\x00{name}".encode(), digest_size=16).digest()
    return int.from_bytes(digest)


def body_digest(body: bytes) -> bytes:
    """What the index keeps of a body (PostgreSQL computes the same with ``md5(body)``)."""
    return hashlib.md5(body, usedforsecurity=False).digest()


def _micros(value: dt.datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND
