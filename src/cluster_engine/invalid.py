"""``Invalid``: input that breaks the contract's rules, with a detail per problem (where, what, why).

Shared by the server (``RequestInvalid``, a 400) and the storage layer (a catalog file's problems), so that
neither imports the other for it; the server turns any ``Invalid`` into its 400 body.
"""

from __future__ import annotations

from collections.abc import Sequence

from .schemas import ValidationDetail

INVALID_REQUEST = "Invalid request parameters."


class Invalid(Exception):
    def __init__(self, details: Sequence[ValidationDetail], message: str = INVALID_REQUEST) -> None:
        super().__init__(message)
        self.details = list(details)
