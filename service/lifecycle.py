"""Where requests get the model from, and how it gets there: load, validate, warm up, then publish.

The model is loaded in a background task after the server starts listening, so ``/healthz``
answers while a large model loads (a liveness probe that waits on the model restarts pods in a
loop, triton#7014) and ``/readyz`` says 503 with a reason until the model has answered warm-up
inferences. A model is published to the :class:`ModelSlot` whole, in one assignment: a request
sees the old model or the new one, never a half-loaded one (the shape a hot swap will need).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio.to_thread

from service.artifact import ArtifactError
from service.config import Settings
from service.metrics import Metrics
from service.predictor import Predictor, ProviderError, load_predictor

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]


@dataclass(frozen=True)
class Served:
    """A model that passed warm-up, and when."""

    predictor: Predictor
    load_seconds: float
    loaded_at: float  # unix time


class ModelSlot:
    """Holds the served model (or why there is none). Read from any thread, written by one task."""

    def __init__(self) -> None:
        self.status: Status = "loading"
        self.reason: str | None = "loading and warming up the model"
        self.served: Served | None = None

    def publish(self, served: Served) -> None:
        self.served = served
        self.status, self.reason = "ready", None

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason


async def load_model(
    slot: ModelSlot,
    settings: Settings,
    metrics: Metrics,
    *,
    predictor: Predictor | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> None:
    """Load (or take the injected ``predictor``), warm up in a thread, then publish to ``slot``.

    Failures are logged with their cause, leave the slot ``failed`` and call ``on_failure`` (the
    CLI uses it to exit non-zero); the response to clients stays generic, since causes name paths.
    """
    started = time.perf_counter()
    try:
        if predictor is None:
            predictor = await anyio.to_thread.run_sync(load_predictor, settings)
        else:
            await anyio.to_thread.run_sync(predictor.warm_up)
    except (ArtifactError, ProviderError) as exc:
        reason = str(exc)
    except Exception as exc:
        logger.exception("unexpected error while loading the model")
        reason = f"unexpected {type(exc).__name__} while loading the model"
    else:
        load_seconds = time.perf_counter() - started
        served = Served(predictor, load_seconds, time.time())
        runtime = predictor.runtime
        slot.publish(served)
        metrics.set_model(
            version=predictor.metadata.model_version,
            provider=runtime.provider,
            fallback=runtime.fallback,
            load_seconds=load_seconds,
            loaded_at=served.loaded_at,
        )
        logger.info(
            "model ready",
            extra={
                "model_version": predictor.metadata.model_version,
                "provider": runtime.provider,
                "requested_providers": list(runtime.requested),
                "provider_fallback": runtime.fallback,
                "batch_sizes": list(runtime.batch_sizes),
                "load_seconds": round(load_seconds, 4),
            },
        )
        return
    slot.fail("the model failed to load; see the service log")
    metrics.ready.set(0)
    logger.error(f"cannot serve: {reason}", extra={"model_path": str(settings.model_path)})
    if on_failure is not None:
        on_failure(reason)
