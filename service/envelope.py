"""The one JSON error envelope: every non-2xx answer is written here.

The exception handlers (``service/api/errors.py``), the middleware and the direct ``/predict``
route all answer through :func:`rejection`, so a typed error looks and counts the same whichever
layer refused the request. Starlette only: the middleware must not depend on the routers.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.responses import Response

from service.errors import ErrorDetail, ServiceError
from service.metrics import Metrics
from service.schemas import ErrorItem, ErrorResponse


def error_response(
    status_code: int,
    code: str,
    message: str,
    detail: Sequence[ErrorDetail] = (),
    headers: dict[str, str] | None = None,
) -> Response:
    items = [ErrorItem(field=d.field, type=d.type, message=d.message) for d in detail]
    body = ErrorResponse(error=code, message=message, detail=items).model_dump_json()
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def rejection(error: ServiceError, metrics: Metrics) -> Response:
    """A typed error as the envelope, counted by its code."""
    metrics.rejected.labels(error.code).inc()
    return error_response(error.status_code, error.code, error.message, error.detail, error.headers)
