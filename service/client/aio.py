"""The asyncio client: the same calls as :class:`service.client.Client`, awaited."""

from __future__ import annotations

import asyncio
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


class AsyncClient:
    """``async with AsyncClient(url) as c: await c.predict(...)``; see :class:`service.client.Client`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 30.0,
        retry: Retry | None = None,
        admin_token: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        headers = {} if admin_token is None else {"Authorization": f"Bearer {admin_token}"}
        self._owned = http is None
        self._http = http if http is not None else httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self._http.headers.update(headers)
        self.retry = retry if retry is not None else Retry()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def send(self, call: Call) -> httpx.Response:
        headers = {} if call.content_type is None else {"Content-Type": call.content_type}
        for attempt in range(self.retry.attempts):
            response = await self._http.request(call.method, call.path, content=call.content, headers=headers)
            if response.is_success:
                return response
            error = error_from(response.status_code, response.content, response.headers.get("retry-after"))
            if not isinstance(error, UnavailableError) or attempt == self.retry.attempts - 1:
                raise error
            await asyncio.sleep(self.retry.wait(attempt, error.retry_after))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _json(self, call: Call) -> Any:
        return (await self.send(call)).json()

    async def predict(self, user: User) -> Prediction:
        return wire.read_prediction(await self._json(wire.predict_call(user)))

    async def predict_batch(self, users: Sequence[User]) -> Predictions:
        return wire.read_predictions(await self._json(wire.batch_call(users)))

    async def predict_columns(self, columns: Columns) -> Predictions:
        return wire.read_predictions(await self._json(wire.columns_call(columns)))

    async def predict_arrow(self, table: Any) -> Any:
        return read_table((await self.send(wire.arrow_call(stream_of(table)))).content)

    async def send_events(self, events: Sequence[StoredEvent]) -> Stored:
        return wire.read_stored(await self._json(wire.events_call(events)))

    async def reload(self, model_path: str | None = None) -> Reloaded:
        """Hot-swap the served model (admin token needed); ``None``: reload the configured file."""
        return wire.read_reloaded(await self._json(wire.reload_call(model_path)))

    async def model_info(self) -> ModelInfo:
        return wire.read_model(await self._json(Call("GET", "/v1/model")))

    async def readiness(self) -> Readiness:
        response = await self._http.get("/readyz")
        if response.status_code not in (200, 503):
            raise error_from(response.status_code, response.content, None)
        return wire.read_readiness(response.json())

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> Readiness:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                state = await self.readiness()
                if state.ready:
                    return state
                last = f"{state.status}: {state.reason}"
            except (httpx.TransportError, ApiError) as exc:
                last = str(exc) or type(exc).__name__
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not ready within {timeout:g} s ({last})")
            await asyncio.sleep(interval)
