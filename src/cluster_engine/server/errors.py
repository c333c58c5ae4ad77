"""Domain exceptions and the one table that turns them into contract bodies.

    ApiError                      status  body
     ├── RequestInvalid            400     errorStatusMessage{group: "request", validationDetail: […]}
     ├── Unauthenticated           401     errorStatusMessage{group: "auth_verify", code 0|1} + header
     ├── NotPermitted              403     error{reason}
     ├── NoSuchResource            404     error{reason}
     ├── MethodNotAllowed          405     error{reason}
     ├── StateConflict             409     error{reason}
     ├── RequestTimeout            408     error{reason} + Connection: close
     ├── BodyTooLarge              413     error{reason}
     ├── TooManyRequests           429     error{reason} + Retry-After (CE_RATE_LIMIT)
     └── Unavailable               503     error{reason: "database is unavailable"} + Retry-After

What the store refuses (storage/errors.py, and a catalog file's ``Invalid`` problems) becomes one of these
in ``of_storage``, the one place that maps them: ``Duplicate`` 409, ``ImageMissing`` 404, ``Invalid`` 400.

Anything else that escapes a handler is a 500 ``error{reason: "internal server error"}``; the
traceback goes to the log, never into the body.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..invalid import INVALID_REQUEST, Invalid
from ..schemas import Error, ErrorStatusMessage, ValidationDetail, json_encoder
from ..storage.errors import Duplicate, ImageMissing, StoreError

INVALID_TOKEN = "Invalid access token."
EXPIRED_TOKEN = "Expired access token."
DATABASE_UNAVAILABLE = "database is unavailable"
INTERNAL_ERROR = "internal server error"


class ApiError(Exception):
    status: int = 500

    def body(self) -> bytes:
        return json_encoder.encode(Error(reason=str(self) or INTERNAL_ERROR))

    def headers(self) -> dict[str, str]:
        return {}


class RequestInvalid(ApiError, Invalid):
    status = 400

    def __init__(self, details: Sequence[ValidationDetail], message: str = INVALID_REQUEST) -> None:
        Invalid.__init__(self, details, message)

    def body(self) -> bytes:
        return json_encoder.encode(
            ErrorStatusMessage(code=0, group="request", message=str(self), validationDetail=self.details)
        )


class Unauthenticated(ApiError):
    """Missing, malformed, badly signed or expired bearer token."""

    status = 401

    def __init__(self, *, expired: bool = False, missing: bool = False, detail: str = "") -> None:
        super().__init__(EXPIRED_TOKEN if expired else INVALID_TOKEN)
        self.expired = expired
        self.missing = missing
        self.detail = detail  # for logs only

    @property
    def reason(self) -> str:
        """A bounded label for metrics: missing, expired or invalid."""
        return "missing" if self.missing else "expired" if self.expired else "invalid"

    def body(self) -> bytes:
        return json_encoder.encode(
            ErrorStatusMessage(code=1 if self.expired else 0, group="auth_verify", message=str(self))
        )

    def headers(self) -> dict[str, str]:
        if self.missing:  # RFC 6750 §3.1: no error code when the request carried no credentials
            return {"WWW-Authenticate": 'Bearer realm="cluster-engine"'}
        description = "The access token expired" if self.expired else "The access token is invalid"
        return {
            "WWW-Authenticate": (
                f'Bearer realm="cluster-engine", error="invalid_token", error_description="{description}"'
            )
        }


class NotPermitted(ApiError):
    status = 403


class NoSuchResource(ApiError):
    status = 404


class MethodNotAllowed(ApiError):
    status = 405


class StateConflict(ApiError):
    status = 409


class RequestTimeout(ApiError):
    """The request body did not arrive within CE_HTTP_BODY_TIMEOUT; the connection is not reused."""

    status = 408

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class BodyTooLarge(ApiError):
    status = 413

    def __init__(self, message: str, *, connection_reusable: bool = False) -> None:
        super().__init__(message)
        self.connection_reusable = connection_reusable

    def headers(self) -> dict[str, str]:
        # When the rest of the body was not read, this connection can't carry another request.
        return {} if self.connection_reusable else {"Connection": "close"}


class Unavailable(ApiError):
    status = 503
    retry_after = 1

    def __init__(self, message: str = DATABASE_UNAVAILABLE) -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TooManyRequests(ApiError):
    """The caller's org is past its share (CE_RATE_LIMIT)."""

    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded for this org; retry after {retry_after} s")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


INTERNAL_ERROR_BODY = json_encoder.encode(Error(reason=INTERNAL_ERROR))


def of_storage(error: StoreError | Invalid) -> ApiError:
    """The contract's answer to what the store refused (its message is the reason shown)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Invalid):
        return RequestInvalid(error.details, str(error))
    if isinstance(error, Duplicate):
        return StateConflict(str(error))
    if isinstance(error, ImageMissing):
        return NoSuchResource(str(error))
    return ApiError()  # a refusal without a contract answer: a 500
