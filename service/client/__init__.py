"""A typed Python client for the service, sync (:class:`Client`) and asyncio (:class:`AsyncClient`).

Built on httpx alone and importing no server code, so a caller needs neither FastAPI nor
onnxruntime. 503s (not ready, overloaded) are retried after ``Retry-After``; other errors raise
an :class:`ApiError` subclass carrying the service's envelope. README.md, "Python client".
"""

from service.client.aio import AsyncClient
from service.client.errors import (
    ApiError,
    ErrorItem,
    InvalidRequestError,
    NotFoundError,
    ServerError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
)
from service.client.models import (
    Columns,
    Event,
    ModelInfo,
    Prediction,
    Predictions,
    Readiness,
    Reloaded,
    Stored,
    StoredEvent,
    User,
)
from service.client.sync import Client
from service.client.wire import NO_RETRY, Retry

__all__ = [
    "NO_RETRY",
    "ApiError",
    "AsyncClient",
    "Client",
    "Columns",
    "ErrorItem",
    "Event",
    "InvalidRequestError",
    "ModelInfo",
    "NotFoundError",
    "Prediction",
    "Predictions",
    "Readiness",
    "Reloaded",
    "Retry",
    "ServerError",
    "Stored",
    "StoredEvent",
    "TooLargeError",
    "UnauthorizedError",
    "UnavailableError",
    "User",
]
