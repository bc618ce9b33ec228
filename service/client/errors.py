"""Typed errors carrying the service's error envelope (``{"error", "message", "detail"}``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorItem:
    """One problem the service found, located by its field path."""

    field: str
    type: str
    message: str


class ApiError(Exception):
    """A non-2xx answer. ``code`` is the envelope's ``error`` (``invalid_input``, ``not_ready``, ...)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: tuple[ErrorItem, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        fields = ", ".join(item.field for item in detail[:5])
        super().__init__(f"{status} {code}: {message}" + (f" ({fields})" if fields else ""))
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after = retry_after


class InvalidRequestError(ApiError):
    """400, 408, 415 or 422: the request itself is wrong; sending it again will not help."""


class UnauthorizedError(ApiError):
    """401: a missing or wrong admin token."""


class NotFoundError(ApiError):
    """404: an unknown user (``unknown_user``) or endpoint."""


class TooLargeError(ApiError):
    """413: too many users, or a body over the server's limit; split the batch."""


class UnavailableError(ApiError):
    """503 still, after every retry: not ready, overloaded, or the event store is down."""


class ServerError(ApiError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequestError,
    401: UnauthorizedError,
    404: NotFoundError,
    408: InvalidRequestError,
    413: TooLargeError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    503: UnavailableError,
}


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the service sends whole seconds; an HTTP date is not used)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_from(status: int, body: bytes, retry_after: str | None) -> ApiError:
    """The typed error for an answer; a body that is not the envelope (a proxy's page) still
    gives its status, with a short excerpt as the message."""
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    code, message = f"http_{status}", body[:200].decode("utf-8", "replace")
    items: tuple[ErrorItem, ...] = ()
    try:
        envelope: Any = json.loads(body)
    except ValueError:
        envelope = None
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), str):
        code = envelope["error"]
        message = str(envelope.get("message", code))
        items = tuple(
            ErrorItem(str(d.get("field", "")), str(d.get("type", "")), str(d.get("message", "")))
            for d in envelope.get("detail") or ()
            if isinstance(d, dict)
        )
    return cls(status, code, message, items, retry_after_seconds(retry_after))
