"""Where requests get the model from, and how it gets there: load, validate, warm up, then publish.

The first load runs in a background task once the server listens, so ``/healthz`` answers while a
large model loads (a liveness probe that waits on the model restarts pods in a loop) and
``/readyz`` is 503 with a reason until warm-up has run. A hot swap (``rollout.Change("reload")``)
takes the same path beside the served model. Either way the model reaches the :class:`ModelSlot` whole, in
one assignment; a request keeps the :class:`LoadedModel` it started with, and a file that fails any
step is refused while the old model keeps serving: the slot never passes through "no model".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

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
    path: Path | None = None  # the file it came from (None: a predictor injected by a test)


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


@dataclass(frozen=True)
class Models:
    """What a slot serves: replaced whole, so a reader sees one state or the next, never a mix."""

    served: LoadedModel | None = None
    shadow: Shadow | None = None
    canary: Canary | None = None


class Generation(Protocol):
    """A counter every worker process reads (shared memory): the model state in force."""

    @property
    def value(self) -> int: ...


class ModelSlot:
    """Holds the served model (or why there is none), and the shadow and canary models beside it.
    Read from any thread, written by one task at a time (under the reload lock); the three are
    replaced together (:class:`Models`), so a reader sees an old state or a new one.

    With worker processes, a change is first *staged* in every worker under a generation number,
    then committed by one write of the shared ``generation``: each worker switches to the staged
    state at its next read. A request that sees the new state in one worker therefore finds it in
    every worker from then on (no client sees new, then old).
    """

    def __init__(self, generation: Generation | None = None) -> None:
        self.status: Status = "loading"
        self.reason: str | None = "loading and warming up the model"
        self.models = Models()
        self.draining = False
        self._shared = generation
        self._generation = 0 if generation is None else generation.value
        self._staged: dict[int, Models] = {}
        self._switch = threading.Lock()
        #: called with the new and the previous models after each switch to a staged state (the
        #: metrics gauges), in whichever thread read the slot
        self.on_switch: Callable[[Models, Models], None] | None = None

    def current(self) -> Models:
        shared = self._shared
        if shared is not None and shared.value != self._generation:
            self._catch_up(shared.value)
        return self.models

    @property
    def served(self) -> LoadedModel | None:
        return self.current().served

    @property
    def shadow(self) -> Shadow | None:
        return self.current().shadow

    @property
    def canary(self) -> Canary | None:
        return self.current().canary

    @property
    def generation(self) -> int:
        self.current()
        return self._generation

    @property
    def ready(self) -> bool:
        """What ``/readyz`` says: a warmed model, and not shutting down."""
        return self.served is not None and not self.draining

    def install(self, models: Models) -> None:
        """Serve ``models`` from the next read on (one process; under the reload lock)."""
        self.models = models
        if models.served is not None and not self.draining:
            self.status, self.reason = "ready", None

    def publish(self, served: LoadedModel) -> None:
        self.install(replace(self.models, served=served))

    def stage(self, generation: int, models: Models) -> None:
        """Keep ``models`` for the commit of ``generation`` (a write of the shared counter)."""
        with self._switch:
            self._staged[generation] = models

    def drop(self, generation: int) -> None:
        with self._switch:
            self._staged.pop(generation, None)

    def adopt(self, generation: int, models: Models) -> None:
        """Start from a state committed before this worker started (a restarted worker)."""
        with self._switch:
            self.install(models)
            self._generation = generation

    def _catch_up(self, generation: int) -> None:
        with self._switch:
            if self._generation == generation:
                return  # another thread switched first
            models = self._staged.pop(generation, None)
            # generations committed before this one and never applied are superseded
            self._staged = {g: m for g, m in self._staged.items() if g > generation}
            self._generation = generation
            if models is None:
                # Only a worker that missed the staging (it was starting) lands here; it keeps what
                # it has and says so rather than guess.
                logger.error(
                    "a model change was committed without being staged in this worker",
                    extra={"generation": generation},
                )
                return
            previous = self.models
            self.install(models)
        if self.on_switch is not None:
            self.on_switch(models, previous)

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
        previous = slot.current()
        slot.publish(served)
        publish_models(metrics, slot.current(), previous)
    logger.info("model ready", extra=describe(served))


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
    return LoadedModel(predictor, time.perf_counter() - started, time.time(), path)


def check_version_free(current: Models, candidate: LoadedModel) -> None:
    """A reload must not serve the version loaded as the shadow or canary: metrics, outcomes and
    drift are kept by version, and the shadow would be compared with itself."""
    version = candidate.predictor.metadata.model_version
    for role, other in loaded_models(current):
        if role != "primary" and other.predictor.metadata.model_version == version:
            raise ModelRejectedError(
                f"model refused, the served model stays: model_version {version} is loaded as the "
                f"{role}; promote the canary, or unload the {role} first"
            )


def loaded_models(models: Models | ModelSlot) -> list[tuple[Role, LoadedModel]]:
    """What is loaded, by role: the served model first, then the shadow and the canary."""
    if isinstance(models, ModelSlot):
        models = models.current()
    out: list[tuple[Role, LoadedModel]] = []
    if models.served is not None:
        out.append(("primary", models.served))
    if models.shadow is not None:
        out.append(("shadow", models.shadow.served))
    if models.canary is not None:
        out.append(("canary", models.canary.served))
    return out


def publish_models(metrics: Metrics, models: Models, previous: Models | None) -> None:
    """Point the gauges at ``models`` (the served model's only when it changed)."""
    metrics.set_loaded((role, m.predictor.metadata.model_version) for role, m in loaded_models(models))
    served = models.served
    if served is None or (previous is not None and previous.served is served):
        return
    runtime = served.predictor.runtime
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
