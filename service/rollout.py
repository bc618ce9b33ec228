"""Shadow and canary models beside the served one: load, route, promote, unload.

Each is loaded, validated and warmed up like a hot swap (``lifecycle.prepare_candidate``) and
published in one assignment to the :class:`~service.lifecycle.ModelSlot`; a file that fails any
step is refused with nothing that serves touched. A canary answers the users whose id hashes into
its share; promoting it makes it the served model in one assignment, so its users keep it and
everyone else moves over with their next request, and no request ever finds no model.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio

from service.config import Settings
from service.errors import ModelRejectedError, NoCanaryError, NotReadyError
from service.lifecycle import (
    Canary,
    LoadedModel,
    ModelSlot,
    Shadow,
    describe,
    loaded_models,
    prepare_candidate,
    publish_primary,
    publish_roles,
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


def _version(model: LoadedModel | None) -> str | None:
    return None if model is None else model.predictor.metadata.model_version


def _check_beside(slot: ModelSlot, candidate: LoadedModel, role: str) -> None:
    """A second model must answer the same question as the served one, under a version of its own."""
    primary = slot.served
    if primary is None:
        raise NotReadyError(f"no model is being served yet to load a {role} beside")
    meta, served = candidate.predictor.metadata, primary.predictor.metadata
    if meta.horizon_days != served.horizon_days:
        raise ModelRejectedError(
            f"model refused, the served model stays: its horizon_days is {meta.horizon_days}, the "
            f"served model's {served.horizon_days}: a {role} must predict the same horizon"
        )
    for other_role, other in loaded_models(slot):
        if other_role != role and _version(other) == meta.model_version:
            raise ModelRejectedError(
                f"model refused, the served model stays: model_version {meta.model_version} is "
                f"already loaded as the {other_role}; each loaded model needs a version of its own"
            )


async def _place(
    slot: ModelSlot, settings: Settings, path: Path, role: str
) -> tuple[LoadedModel, Shadow | Canary | None]:
    candidate = await prepare_candidate(settings, path, slot, what=f"{role} model")
    _check_beside(slot, candidate, role)
    return candidate, slot.shadow if role == "shadow" else slot.canary


async def load_shadow(
    slot: ModelSlot, settings: Settings, metrics: Metrics, path: Path, sample: float, *, lock: anyio.Lock
) -> Placed:
    """Load ``path`` as the shadow model (replacing any), scoring ``sample`` of the scoring calls."""
    async with lock:
        candidate, previous = await _place(slot, settings, path, "shadow")
        slot.shadow = Shadow(candidate, sample)
        publish_roles(slot, metrics)
    placed = Placed(candidate, None if previous is None else _version(previous.served))
    logger.info("shadow model loaded", extra={**describe(candidate), "sample": sample})
    return placed


async def load_canary(
    slot: ModelSlot, settings: Settings, metrics: Metrics, path: Path, percent: float, *, lock: anyio.Lock
) -> Placed:
    """Load ``path`` as the canary model (replacing any), answering ``percent`` of users."""
    async with lock:
        candidate, previous = await _place(slot, settings, path, "canary")
        slot.canary = Canary(candidate, percent)
        publish_roles(slot, metrics)
    placed = Placed(candidate, None if previous is None else _version(previous.served))
    logger.info("canary model loaded", extra={**describe(candidate), "percent": percent})
    return placed


async def reshare(slot: ModelSlot, role: str, share: float, *, lock: anyio.Lock) -> Placed | None:
    """Change the loaded shadow's sample or the loaded canary's percent, keeping the model (no
    load); ``None`` when that role is empty."""
    async with lock:
        if role == "shadow" and slot.shadow is not None:
            current: LoadedModel = slot.shadow.served
            slot.shadow = Shadow(current, share)
        elif role == "canary" and slot.canary is not None:
            current = slot.canary.served
            slot.canary = Canary(current, share)
        else:
            return None
    logger.info(f"{role} share changed", extra={"model_version": _version(current), "share": share})
    return Placed(current, _version(current))


async def unload(slot: ModelSlot, metrics: Metrics, role: str, *, lock: anyio.Lock) -> str | None:
    """Unload the shadow or the canary (a canary's rollback); the version unloaded, or ``None``."""
    async with lock:
        if role == "shadow":
            gone = None if slot.shadow is None else slot.shadow.served
            slot.shadow = None
        else:
            gone = None if slot.canary is None else slot.canary.served
            slot.canary = None
        publish_roles(slot, metrics)
    if gone is not None:
        logger.info(f"{role} model unloaded", extra={"model_version": _version(gone)})
    return _version(gone)


async def promote_canary(slot: ModelSlot, metrics: Metrics, *, lock: anyio.Lock) -> Placed:
    """Serve the canary to everyone: it becomes the served model, and there is no canary."""
    async with lock:
        canary = slot.canary
        if canary is None:
            raise NoCanaryError("no canary model is loaded to promote")
        previous = _version(slot.served)
        # Served first, then no canary: a request in between routes its canary users to the same
        # model it now serves everyone, so no order of reads sees a model twice or none.
        publish_primary(slot, metrics, canary.served)
        slot.canary = None
        publish_roles(slot, metrics)
    logger.info("canary promoted", extra={**describe(canary.served), "previous_version": previous})
    return Placed(canary.served, previous)


async def load_configured(slot: ModelSlot, settings: Settings, metrics: Metrics, *, lock: anyio.Lock) -> None:
    """The shadow and canary named in the settings, after the served model has loaded. One that
    fails is logged and left out: the served model is what readiness is about."""
    if slot.served is None:
        return
    s = settings
    if s.shadow_model is not None:
        try:
            await load_shadow(slot, s, metrics, s.shadow_model, s.shadow_sample, lock=lock)
        except (ModelRejectedError, NotReadyError) as exc:
            logger.error(f"PI_SHADOW_MODEL not loaded, serving without a shadow: {exc}")
    if s.canary_model is not None:
        try:
            await load_canary(slot, s, metrics, s.canary_model, s.canary_percent, lock=lock)
        except (ModelRejectedError, NotReadyError) as exc:
            logger.error(f"PI_CANARY_MODEL not loaded, serving without a canary: {exc}")
