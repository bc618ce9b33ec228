"""Shadow and canary models beside the served one: load, route, promote, unload.

Every admin change of the loaded models (a hot swap, a shadow or canary placed, re-shared,
unloaded, promoted) is a :class:`Change`: data that :func:`plan` turns into the next
:class:`~service.lifecycle.Models` (loading, validating and warming up any file like a hot swap,
``lifecycle.prepare_candidate``), which is then published whole; a file that fails any step is
refused with nothing that serves touched. With worker processes the same change is planned in
every worker and committed at once (:class:`Coordinator`, ``service/siblings.py``). A canary
answers the users whose id hashes into its share; promoting it makes it the served model in one
assignment, so its users keep it and everyone else moves over with their next request, and no
request ever finds no model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio

from service.config import Settings
from service.errors import ModelRejectedError, NoCanaryError, NotReadyError
from service.lifecycle import (
    Canary,
    LoadedModel,
    Models,
    ModelSlot,
    Role,
    Shadow,
    check_version_free,
    describe,
    loaded_models,
    prepare_candidate,
    publish_models,
)
from service.metrics import Metrics

logger = logging.getLogger(__name__)

#: A user's place on the canary's scale: percent is applied in steps of 0.01 %.
CANARY_BUCKETS = 10_000


def canary_bucket(user_id: str) -> int:
    """``0 <= bucket < CANARY_BUCKETS``, the same for a user on every replica and after restarts:
    blake2b, not ``hash()``, which Python salts per process. Independent of the outcome sampling's
    crc32, so the canary's users are not also the recorded ones, or the unrecorded ones."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % CANARY_BUCKETS


def in_canary(user_id: str, percent: float) -> bool:
    """Whether the canary answers this user. Monotone in ``percent``: raising it only adds users."""
    return canary_bucket(user_id) < round(percent * CANARY_BUCKETS / 100)


def route(slot: ModelSlot, served: LoadedModel, user_id: str) -> LoadedModel | None:
    """The canary for a user in its share, else ``None`` (the request keeps ``served``)."""
    canary = slot.canary
    if canary is None or canary.served is served or not in_canary(user_id, canary.percent):
        return None
    return canary.served


@dataclass(frozen=True)
class Placed:
    served: LoadedModel
    previous_version: str | None  # the model this one replaced in its role


Kind = Literal["reload", "place", "reshare", "unload", "promote"]


@dataclass(frozen=True)
class Change:
    """One change of the loaded models, as data (it travels to the other worker processes).

    ``reload``: ``path`` becomes the served model. ``place``: ``path`` becomes the ``role``'s model
    with ``share`` (the shadow's sample, the canary's percent). ``reshare``: the ``role``'s loaded
    model keeps serving with ``share``. ``unload``: the ``role`` is emptied. ``promote``: the
    canary becomes the served model."""

    kind: Kind
    role: Role = "primary"
    path: str | None = None
    share: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "role": self.role, "path": self.path, "share": self.share}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Change:
        return cls(kind=data["kind"], role=data["role"], path=data["path"], share=data["share"])


@dataclass(frozen=True)
class Planned:
    """What a change leads to: the next models, what the client is told, what is logged."""

    models: Models
    placed: Placed | None = None  # reload, place, reshare (None: that role is empty), promote
    unloaded: str | None = None  # unload: the version unloaded
    message: str | None = None  # logged once committed
    extra: dict[str, object] | None = None


class Coordinator(Protocol):
    """Makes a planned change every worker process's at once (``service/cluster.py``)."""

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held around planning and committing: one change at a time across the processes."""
        ...

    async def commit(self, change: Change, planned: Planned) -> None:
        """Plan ``change`` in every other worker, then switch all of them to it at once; raises the
        first worker's refusal (nothing changes anywhere then)."""
        ...


def _version(model: LoadedModel | None) -> str | None:
    return None if model is None else model.predictor.metadata.model_version


def _check_beside(current: Models, candidate: LoadedModel, role: str) -> None:
    """A second model must answer the same question as the served one, under a version of its own."""
    primary = current.served
    if primary is None:
        raise NotReadyError(f"no model is being served yet to load a {role} beside")
    meta, served = candidate.predictor.metadata, primary.predictor.metadata
    if meta.horizon_days != served.horizon_days:
        raise ModelRejectedError(
            f"model refused, the served model stays: its horizon_days is {meta.horizon_days}, the "
            f"served model's {served.horizon_days}: a {role} must predict the same horizon"
        )
    for other_role, other in loaded_models(current):
        if other_role != role and _version(other) == meta.model_version:
            raise ModelRejectedError(
                f"model refused, the served model stays: model_version {meta.model_version} is "
                f"already loaded as the {other_role}; each loaded model needs a version of its own"
            )


async def plan(slot: ModelSlot, settings: Settings, change: Change) -> Planned:
    """The models ``change`` leads to from the slot's, loading any file it names; raises the
    client's error (422 refused, 409 no canary, 503 not ready) with nothing changed. Call it under
    the reload lock."""
    current = slot.current()
    if change.kind == "reload":
        assert change.path is not None
        served = await prepare_candidate(settings, Path(change.path), slot, what="model reload")
        check_version_free(current, served)
        previous = _version(current.served)
        return Planned(
            replace(current, served=served),
            Placed(served, previous),
            message="model reloaded",
            extra={**describe(served), "previous_version": previous},
        )
    if change.kind == "place":
        assert change.path is not None
        assert change.share is not None
        role = change.role
        candidate = await prepare_candidate(settings, Path(change.path), slot, what=f"{role} model")
        _check_beside(current, candidate, role)
        gone: Shadow | Canary | None
        if role == "shadow":
            gone = current.shadow
            models = replace(current, shadow=Shadow(candidate, change.share))
            share_name = "sample"
        else:
            gone = current.canary
            models = replace(current, canary=Canary(candidate, change.share))
            share_name = "percent"
        return Planned(
            models,
            Placed(candidate, None if gone is None else _version(gone.served)),
            message=f"{role} model loaded",
            extra={**describe(candidate), share_name: change.share},
        )
    if change.kind == "reshare":
        assert change.share is not None
        if change.role == "shadow" and current.shadow is not None:
            kept = current.shadow.served
            models = replace(current, shadow=Shadow(kept, change.share))
        elif change.role == "canary" and current.canary is not None:
            kept = current.canary.served
            models = replace(current, canary=Canary(kept, change.share))
        else:
            return Planned(current)  # nothing loaded in that role: the caller loads a file
        return Planned(
            models,
            Placed(kept, _version(kept)),
            message=f"{change.role} share changed",
            extra={"model_version": _version(kept), "share": change.share},
        )
    if change.kind == "unload":
        if change.role == "shadow":
            gone_model = None if current.shadow is None else current.shadow.served
            models = replace(current, shadow=None)
        else:
            gone_model = None if current.canary is None else current.canary.served
            models = replace(current, canary=None)
        if gone_model is None:
            return Planned(models)
        return Planned(
            models,
            unloaded=_version(gone_model),
            message=f"{change.role} model unloaded",
            extra={"model_version": _version(gone_model)},
        )
    canary = current.canary  # promote
    if canary is None:
        raise NoCanaryError("no canary model is loaded to promote")
    previous = _version(current.served)
    # One state with the canary served and no canary: every read sees the old pair or the new one.
    return Planned(
        Models(served=canary.served, shadow=current.shadow, canary=None),
        Placed(canary.served, previous),
        message="canary promoted",
        extra={**describe(canary.served), "previous_version": previous},
    )


async def apply(
    slot: ModelSlot,
    settings: Settings,
    metrics: Metrics,
    change: Change,
    *,
    lock: anyio.Lock,
    coordinator: Coordinator | None = None,
) -> Planned:
    """Plan ``change`` and publish it (in every worker process when there is a ``coordinator``).
    Changes run one at a time; a refused one changes nothing and counts as a failed reload."""
    async with contextlib.AsyncExitStack() as stack:
        if coordinator is not None:
            await stack.enter_async_context(coordinator.exclusive())
        await stack.enter_async_context(lock)
        try:
            planned = await plan(slot, settings, change)
            if planned.message is not None:  # something to change
                if coordinator is not None:
                    await coordinator.commit(change, planned)
                else:
                    previous = slot.current()
                    slot.install(planned.models)
                    publish_models(metrics, planned.models, previous)
        except Exception:
            if change.kind == "reload":
                metrics.model_reloads.labels("failure").inc()
            raise
        if change.kind == "reload":
            metrics.model_reloads.labels("success").inc()
    if planned.message is not None:
        logger.info(planned.message, extra=planned.extra)
    return planned


async def load_configured(
    slot: ModelSlot,
    settings: Settings,
    metrics: Metrics,
    *,
    lock: anyio.Lock,
    log: Callable[[str], None] = logger.error,
) -> None:
    """The shadow and canary named in the settings, after the served model has loaded. One that
    fails is logged and left out: the served model is what readiness is about."""
    if slot.served is None:
        return
    s = settings
    for role, path, share, setting in (
        ("shadow", s.shadow_model, s.shadow_sample, "PI_SHADOW_MODEL"),
        ("canary", s.canary_model, s.canary_percent, "PI_CANARY_MODEL"),
    ):
        if path is None:
            continue
        change = Change("place", role, str(path), share)  # type: ignore[arg-type]
        try:
            await apply(slot, s, metrics, change, lock=lock)
        except (ModelRejectedError, NotReadyError) as exc:
            log(f"{setting} not loaded, serving without a {role}: {exc}")
