"""Every error the SDK raises, with the contract's decoded error body on it.

    ClusterEngineError               .status (None without a response), .body, .message, .response
     ├── TransportError               no response: connection refused or reset, DNS, timeout
     ├── ValidationError       400    .details: list[ValidationDetail]   (body: ErrorStatusMessage)
     ├── AuthError             401    .code (0 invalid, 1 expired), .message (body: ErrorStatusMessage)
     ├── Forbidden             403    the token lacks the scope the change needs   (body: Error)
     ├── NotFound              404    missing, or not visible to the caller          (body: Error)
     ├── Conflict              409    name already taken in this idc for this owner  (body: Error)
     ├── PayloadTooLarge       413    request body over 1 MiB                        (body: Error)
     └── ServerError           5xx    (body: Error)
          └── ServiceUnavailable 503  .retry_after: seconds, from the Retry-After header

Any other status (an unexpected 3xx/4xx, a response body that is not the contract's) raises
``ClusterEngineError`` itself, so ``except ClusterEngineError`` catches everything this SDK raises.
"""

from __future__ import annotations

import httpx

from ..schemas import Error, ErrorStatusMessage, ValidationDetail

__all__ = [
    "AuthError",
    "ClusterEngineError",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "TransportError",
    "ValidationError",
]


class ClusterEngineError(Exception):
    """The root of every SDK error.

    ``status`` is the HTTP status (``None`` when no response arrived), ``body`` the decoded contract body
    (``ErrorStatusMessage`` for 400/401, ``Error`` otherwise; ``None`` when the body is not the contract's),
    ``message`` a one-line human description, ``response`` the raw ``httpx.Response`` when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: ErrorStatusMessage | Error | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        self.response = response

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, message={self.message!r})"


class TransportError(ClusterEngineError):
    """No response: the connection failed or timed out (after any retries)."""


class ValidationError(ClusterEngineError):
    """400: the request was invalid; one ``ValidationDetail`` per offending field."""

    body: ErrorStatusMessage | None

    @property
    def details(self) -> list[ValidationDetail]:
        return list(self.body.validationDetail or []) if self.body is not None else []

    def __str__(self) -> str:
        fields = "; ".join(f"{detail.field}: {detail.reason}" for detail in self.details)
        return f"{self.message} ({fields})" if fields else self.message


class AuthError(ClusterEngineError):
    """401: missing, invalid (``code`` 0) or expired (``code`` 1) access token."""

    body: ErrorStatusMessage | None

    @property
    def code(self) -> int:
        return self.body.code if self.body is not None else 0


class Forbidden(ClusterEngineError):
    """403: the image is visible but the token lacks the scope to change it."""


class NotFound(ClusterEngineError):
    """404: no such image, or one the caller may not see (the two are indistinguishable)."""


class Conflict(ClusterEngineError):
    """409: an image with this name already exists in this idc for this owner."""


class PayloadTooLarge(ClusterEngineError):
    """413: the request body is larger than the server accepts (1 MiB)."""


class ServerError(ClusterEngineError):
    """5xx: the server failed; the body never carries internal detail."""


class ServiceUnavailable(ServerError):
    """503: the server cannot confirm fresh data (its database is unavailable); try again later."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 503,
        body: ErrorStatusMessage | Error | None = None,
        response: httpx.Response | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body, response=response)
        self.retry_after = retry_after
