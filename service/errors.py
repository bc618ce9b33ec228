"""Typed errors: what the core raises, each with its status and code, and no HTTP in here (the
envelope is ``service/envelope.py``, the framework's handlers ``service/api/errors.py``).

Every non-2xx body is ``{"error": code, "message": text, "detail": [{"field", "type", "message"}]}``.
Codes form a closed set (:data:`REJECT_REASONS`) that doubles as the rejection metric's label
values. Details carry the field path and the kind of problem, never the value the client sent
(error bodies that echo input leak it into logs and proxies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from pydantic import ValidationError

#: Every ``error`` code the service answers with; the ``reason`` label of the rejection counter.
REJECT_REASONS: tuple[str, ...] = (
    "invalid_json",
    "invalid_arrow",
    "unsupported_media_type",
    "invalid_input",
    "too_many_events",
    "too_many_users",
    "body_too_large",
    "request_timeout",
    "overloaded",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "model_rejected",
    "no_canary",
    "not_ready",
    "unknown_user",
    "unknown_model_version",
    "history_compacted",
    "store_unavailable",
    "not_found",
    "method_not_allowed",
    "http_error",
    "internal_error",
)

_MAX_FIELD_PART = 64  # a hostile 10 kB key name is cut, not echoed whole


@dataclass(frozen=True)
class ErrorDetail:
    """One problem with the request, located by its field path (never the offending value); the
    envelope writes it as ``service.schemas.ErrorItem``."""

    field: str
    type: str
    message: str


class ServiceError(Exception):
    """Base of the errors the service answers with; each subclass fixes a status and a code."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, detail: Sequence[ErrorDetail] = (), headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = list(detail)
        self.headers = headers


#: How long a client told to retry (every 503) should wait first, in seconds.
RETRY_AFTER_SECONDS = 1


class RetryableError(ServiceError):
    """A 503: the request was fine but cannot be served now, so the answer carries ``Retry-After``."""

    status_code = 503

    def __init__(self, message: str, detail: Sequence[ErrorDetail] = ()) -> None:
        super().__init__(message, detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @classmethod
    def retry_later(cls, cause: str) -> Self:
        """``cause``, plus the hint a client acts on."""
        return cls(f"{cause}; retry after Retry-After seconds")


class InvalidJSONError(ServiceError):
    status_code = 400
    code = "invalid_json"


class InvalidArrowError(ServiceError):
    status_code = 400
    code = "invalid_arrow"


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInputError(ServiceError):
    status_code = 422
    code = "invalid_input"


class TooManyEventsError(ServiceError):
    status_code = 422
    code = "too_many_events"


class TooManyUsersError(ServiceError):
    status_code = 413
    code = "too_many_users"


class NotReadyError(RetryableError):
    code = "not_ready"


class BodyTooLargeError(ServiceError):
    status_code = 413
    code = "body_too_large"


class RequestTimeoutError(ServiceError):
    status_code = 408
    code = "request_timeout"


class OverloadedError(RetryableError):
    code = "overloaded"


class UnauthorizedError(ServiceError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(ServiceError):
    status_code = 403
    code = "forbidden"


class RateLimitedError(ServiceError):
    """A 429; the caller sets ``Retry-After`` to when the client's bucket has a request again."""

    status_code = 429
    code = "rate_limited"


class ModelRejectedError(ServiceError):
    status_code = 422
    code = "model_rejected"


class NoCanaryError(ServiceError):
    status_code = 409
    code = "no_canary"


class UnknownUserError(ServiceError):
    status_code = 404
    code = "unknown_user"


class UnknownModelVersionError(ServiceError):
    status_code = 404
    code = "unknown_model_version"


class HistoryCompactedError(ServiceError):
    status_code = 422
    code = "history_compacted"


class StoreUnavailableError(RetryableError):
    code = "store_unavailable"


def too_many_users(limit: int, field: str) -> TooManyUsersError:
    """A batch of more than ``limit`` users; ``field`` is where the client put them."""
    return TooManyUsersError(
        f"at most {limit} users per batch request; split it",
        [ErrorDetail(field=field, type="too_long", message=f"more than {limit} users")],
    )


def too_many_events(limit: int, fields: Sequence[str], users: int | None = None) -> TooManyEventsError:
    """``users`` users sent more than ``limit`` events each, named by ``fields`` (the caller caps
    how many it lists); without ``users``, one request carried more than ``limit`` events."""
    message = (
        f"at most {limit} events per request; split it"
        if users is None
        else f"at most {limit} events per user; {users} user(s) sent more"
    )
    return TooManyEventsError(
        message, [ErrorDetail(field=f, type="too_long", message=f"more than {limit} events") for f in fields]
    )


def field_path(loc: Sequence[int | str]) -> str:
    """``("users", 0, "events", 3, "amount")`` -> ``"users[0].events[3].amount"``; ``()`` -> ``"body"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if len(part) <= _MAX_FIELD_PART else part[:_MAX_FIELD_PART] + "..."
            out += f".{text}" if out else text
    return out or "body"


def from_validation_error(exc: ValidationError) -> ServiceError:
    """Map pydantic's errors to ours: unparseable JSON is a 400, anything else a 422."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    items = [ErrorDetail(field=field_path(e["loc"]), type=e["type"], message=e["msg"]) for e in errors]
    if any(e["type"] == "json_invalid" for e in errors):
        return InvalidJSONError("the request body is not valid JSON", items)
    return InvalidInputError("the request body does not match the schema", items)
