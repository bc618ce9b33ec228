"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from service.client import wire
from service.client.arrow import read_table, stream_of
from service.client.errors import ApiError, UnavailableError, error_from
from service.client.models import (
    Columns,
    ModelInfo,
    Prediction,
    Predictions,
    Readiness,
    Reloaded,
    Stored,
    StoredEvent,
    User,
)
from service.client.wire import Call, Retry


class Client:
    """The service over HTTP: ``Client("http://host:8000")``, or with an ``httpx.Client`` of your
    own (``http=``: pooling, TLS, a test transport). A 503 is retried per ``retry``; every other
    non-2xx raises an :class:`~service.client.errors.ApiError` subclass carrying the envelope."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 30.0,
        retry: Retry | None = None,
        admin_token: str | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {} if admin_token is None else {"Authorization": f"Bearer {admin_token}"}
        self._owned = http is None
        self._http = http if http is not None else httpx.Client(base_url=base_url, timeout=timeout)
        self._http.headers.update(headers)
        self.retry = retry if retry is not None else Retry()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def send(self, call: Call) -> httpx.Response:
        """One call with the retry policy; the answer if 2xx, else the typed error."""
        headers = {} if call.content_type is None else {"Content-Type": call.content_type}
        for attempt in range(self.retry.attempts):
            response = self._http.request(call.method, call.path, content=call.content, headers=headers)
            if response.is_success:
                return response
            error = error_from(response.status_code, response.content, response.headers.get("retry-after"))
            if not isinstance(error, UnavailableError) or attempt == self.retry.attempts - 1:
                raise error
            time.sleep(self.retry.wait(attempt, error.retry_after))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _json(self, call: Call) -> Any:
        return self.send(call).json()

    def predict(self, user: User) -> Prediction:
        return wire.read_prediction(self._json(wire.predict_call(user)))

    def predict_batch(self, users: Sequence[User]) -> Predictions:
        return wire.read_predictions(self._json(wire.batch_call(users)))

    def predict_columns(self, columns: Columns) -> Predictions:
        return wire.read_predictions(self._json(wire.columns_call(columns)))

    def predict_arrow(self, table: Any) -> Any:
        """A ``pyarrow.Table`` (or an IPC stream's bytes) in, a ``pyarrow.Table`` out; needs pyarrow."""
        return read_table(self.send(wire.arrow_call(stream_of(table))).content)

    def send_events(self, events: Sequence[StoredEvent]) -> Stored:
        return wire.read_stored(self._json(wire.events_call(events)))

    def reload(self, model_path: str | None = None) -> Reloaded:
        """Hot-swap the served model (admin token needed); ``None``: reload the configured file."""
        return wire.read_reloaded(self._json(wire.reload_call(model_path)))

    def model_info(self) -> ModelInfo:
        return wire.read_model(self._json(Call("GET", "/v1/model")))

    def readiness(self) -> Readiness:
        """``/readyz`` as it is now, ready or not (never retried)."""
        response = self._http.get("/readyz")
        if response.status_code not in (200, 503):
            raise error_from(response.status_code, response.content, None)
        return wire.read_readiness(response.json())

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> Readiness:
        """Poll ``/readyz`` until ready; a server not listening yet counts as not ready.
        :class:`TimeoutError` with the last reason after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                state = self.readiness()
                if state.ready:
                    return state
                last = f"{state.status}: {state.reason}"
            except (httpx.TransportError, ApiError) as exc:
                last = str(exc) or type(exc).__name__
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not ready within {timeout:g} s ({last})")
            time.sleep(interval)
