"""Where requests get the model from, and how it gets there: load, validate, warm up, then publish.

The first load runs in a background task once the server listens, so ``/healthz`` answers while a
large model loads (a liveness probe that waits on the model restarts pods in a loop) and
``/readyz`` is 503 with a reason until warm-up has run. A hot swap (:func:`reload_model`) takes the
same path beside the served model. Either way the model reaches the :class:`ModelSlot` whole, in
one assignment; a request keeps the :class:`LoadedModel` it started with, and a file that fails any
step is refused while the old model keeps serving: the slot never passes through "no model".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread

from service.artifact import ArtifactError
from service.config import Settings
from service.errors import ModelRejectedError
from service.metrics import Metrics
from service.predictor import Predictor, ProviderError, load_predictor

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "draining"]
Role = Literal["primary", "shadow", "canary"]


@dataclass(frozen=True)
class LoadedModel:
    """A model that passed warm-up, and when."""

    predictor: Predictor
    load_seconds: float
    loaded_at: float  # unix time


@dataclass(frozen=True)
class Shadow:
    """A model scored beside the served one on a sample of scoring calls, off the request path."""

    served: LoadedModel
    sample: float  # fraction of scoring calls


@dataclass(frozen=True)
class Canary:
    """A model that answers a share of users, chosen by a hash of their id."""

    served: LoadedModel
    percent: float  # of users


class ModelSlot:
    """Holds the served model (or why there is none), and the shadow and canary models beside it.
    Read from any thread, written by one task at a time (under the reload lock); each field is
    replaced whole, so a reader sees an old model or a new one, never half of either."""

    def __init__(self) -> None:
        self.status: Status = "loading"
        self.reason: str | None = "loading and warming up the model"
        self.served: LoadedModel | None = None
        self.shadow: Shadow | None = None
        self.canary: Canary | None = None
        self.draining = False

    @property
    def ready(self) -> bool:
        """What ``/readyz`` says: a warmed model, and not shutting down."""
        return self.served is not None and not self.draining

    def publish(self, served: LoadedModel) -> None:
        self.served = served
        if not self.draining:
            self.status, self.reason = "ready", None

    def fail(self, reason: str) -> None:
        if self.served is None and not self.draining:
            self.status, self.reason = "failed", reason

    def drain(self) -> None:
        """Fail readiness for good (shutdown). Called from a signal handler: plain assignments
        only, no locks, no logging (the interrupted code may hold them)."""
        self.draining = True
        self.status, self.reason = "draining", "shutting down"


async def load_model(
    slot: ModelSlot,
    settings: Settings,
    metrics: Metrics,
    *,
    lock: anyio.Lock,
    predictor: Predictor | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> None:
    """Load (or take the injected ``predictor``), warm up in a thread, then publish to ``slot``.

    Failures are logged with their cause, leave the slot ``failed`` and call ``on_failure`` (the
    CLI uses it to exit non-zero); the response to clients stays generic, since causes name paths.
    """
    async with lock:  # a reload asked for during the first load waits for it
        try:
            served = await _prepare(settings, settings.model_path, predictor)
        except _LoadError as exc:
            slot.fail("the model failed to load; see the service log")
            logger.error(f"cannot serve: {exc.reason}", extra={"model_path": str(settings.model_path)})
            if on_failure is not None:
                on_failure(exc.reason)
            return
        publish_primary(slot, metrics, served)
    logger.info("model ready", extra=describe(served))


@dataclass(frozen=True)
class Reloaded:
    served: LoadedModel
    previous_version: str | None


async def reload_model(
    slot: ModelSlot, settings: Settings, metrics: Metrics, path: Path, *, lock: anyio.Lock
) -> Reloaded:
    """Load ``path`` beside the served model and swap it in if it passes; else raise
    :class:`ModelRejectedError` and keep serving the old one. Reloads run one at a time."""
    async with lock:
        try:
            served = await prepare_candidate(settings, path, slot, what="model reload")
            _check_version_free(slot, served)
        except ModelRejectedError:
            metrics.model_reloads.labels("failure").inc()
            raise
        previous = _version(slot)
        publish_primary(slot, metrics, served)
        metrics.model_reloads.labels("success").inc()
    logger.info("model reloaded", extra={**describe(served), "previous_version": previous})
    return Reloaded(served, previous)


async def prepare_candidate(settings: Settings, path: Path, slot: ModelSlot, *, what: str) -> LoadedModel:
    """Load, validate and warm up ``path`` beside the served model (a hot swap, a shadow, a
    canary), or raise :class:`ModelRejectedError` with the cause; nothing that serves is touched.
    Call it under the reload lock."""
    try:
        return await _prepare(settings, path, None)
    except _LoadError as exc:
        logger.error(
            f"{what} refused, the served model stays: {exc.reason}",
            extra={"model_path": str(path), "model_version": _version(slot)},
        )
        # The client gets the cause without the server's directory layout.
        safe = exc.reason.replace(str(path), path.name)
        raise ModelRejectedError(f"model refused, the served model stays: {safe}") from None


class _LoadError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _prepare(settings: Settings, path: Path | None, predictor: Predictor | None) -> LoadedModel:
    """Load (or take the injected ``predictor``) and warm up, in a thread; :class:`_LoadError`
    carries a one-line cause (it names paths: for the log, not for clients)."""
    started = time.perf_counter()
    try:
        if predictor is None:
            predictor = await anyio.to_thread.run_sync(load_predictor, settings, path)
        else:
            await anyio.to_thread.run_sync(predictor.warm_up)
    except (ArtifactError, ProviderError) as exc:
        raise _LoadError(str(exc)) from None
    except Exception as exc:
        logger.exception("unexpected error while loading the model")
        raise _LoadError(f"unexpected {type(exc).__name__} while loading the model") from None
    return LoadedModel(predictor, time.perf_counter() - started, time.time())


def _check_version_free(slot: ModelSlot, candidate: LoadedModel) -> None:
    """A reload must not serve the version loaded as the shadow or canary: metrics, outcomes and
    drift are kept by version, and the shadow would be compared with itself."""
    version = candidate.predictor.metadata.model_version
    for role, other in loaded_models(slot):
        if role != "primary" and other.predictor.metadata.model_version == version:
            raise ModelRejectedError(
                f"model refused, the served model stays: model_version {version} is loaded as the "
                f"{role}; promote the canary, or unload the {role} first"
            )


def loaded_models(slot: ModelSlot) -> list[tuple[Role, LoadedModel]]:
    """What is loaded, by role: the served model first, then the shadow and the canary."""
    out: list[tuple[Role, LoadedModel]] = []
    if slot.served is not None:
        out.append(("primary", slot.served))
    if slot.shadow is not None:
        out.append(("shadow", slot.shadow.served))
    if slot.canary is not None:
        out.append(("canary", slot.canary.served))
    return out


def publish_roles(slot: ModelSlot, metrics: Metrics) -> None:
    metrics.set_loaded((role, m.predictor.metadata.model_version) for role, m in loaded_models(slot))


def publish_primary(slot: ModelSlot, metrics: Metrics, served: LoadedModel) -> None:
    """Serve ``served`` from the next request on (one assignment) and point the gauges at it."""
    runtime = served.predictor.runtime
    slot.publish(served)
    publish_roles(slot, metrics)
    metrics.set_model(
        version=served.predictor.metadata.model_version,
        provider=runtime.provider,
        fallback=runtime.fallback,
        load_seconds=served.load_seconds,
        loaded_at=served.loaded_at,
    )


def _version(slot: ModelSlot) -> str | None:
    served = slot.served
    return None if served is None else served.predictor.metadata.model_version


def describe(served: LoadedModel) -> dict[str, object]:
    runtime = served.predictor.runtime
    return {
        "model_version": served.predictor.metadata.model_version,
        "provider": runtime.provider,
        "requested_providers": list(runtime.requested),
        "provider_fallback": runtime.fallback,
        "batch_sizes": list(runtime.batch_sizes),
        "load_seconds": round(served.load_seconds, 4),
    }
