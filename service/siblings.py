"""What a worker process does with and for its siblings (``service/cluster.py`` carries the calls).

:class:`Coordinator` runs an admin change in two phases: the worker that got the request plans it
(loading any file), asks every sibling to plan and stage the same change, and only when all have
staged it writes the shared generation, the single store that switches every worker at its next
read; then it has each sibling switch at once, so all report the new models before the request
is answered. A sibling that refuses, or does not answer, leaves every worker on the old models.
:func:`handler` answers the siblings' calls; :func:`restore` is how a restarted worker catches up.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from service.api.deps import AppContext
from service.cluster import (
    STAGE_TIMEOUT_SECONDS,
    Cluster,
    Handler,
    families_from_json,
    families_to_json,
    merge,
    raise_refusal,
    refusal,
)
from service.config import Settings
from service.drift import ks, psi
from service.errors import NotReadyError, ServiceError
from service.lifecycle import (
    Canary,
    LoadedModel,
    Models,
    ModelSlot,
    Shadow,
    loaded_models,
    prepare_candidate,
    publish_models,
)
from service.metrics import GAUGE_MODES, PREFIX, Metrics
from service.rollout import Change, Planned, plan

logger = logging.getLogger(__name__)


class Coordinator:
    """The :class:`service.rollout.Coordinator` of a worker process."""

    def __init__(self, cluster: Cluster, slot: ModelSlot) -> None:
        self._cluster = cluster
        self._slot = slot

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._cluster.exclusive()

    async def commit(self, change: Change, planned: Planned) -> None:
        c, slot = self._cluster, self._slot
        ticket = c.next_ticket()
        slot.stage(ticket, planned.models)
        message = {"op": "stage", "ticket": ticket, "change": change.to_json()}
        answers = await c.call_others(message, timeout=STAGE_TIMEOUT_SECONDS)
        for index, answer in answers.items():
            if isinstance(answer, BaseException) or not answer.get("ok"):
                slot.drop(ticket)
                await c.call_others({"op": "drop", "ticket": ticket})
                if isinstance(answer, BaseException):
                    raise answer
                raise_refusal(answer, index)
        # Written before the commit, so a worker that starts now reads either the old state under
        # the old generation or this one (it reads under the same lock; see restore).
        c.write_state(describe_state(planned.models, ticket))
        c.commit_generation(ticket)
        slot.current()  # this worker switches now
        synced = await c.call_others({"op": "sync"})
        for index, answer in synced.items():
            if isinstance(answer, BaseException) or answer.get("generation") != ticket:
                # it switches at its next read anyway; say so rather than fail a committed change
                logger.warning(
                    "a worker did not confirm the switch", extra={"worker": index, "generation": ticket}
                )


def describe_state(models: Models, generation: int) -> dict[str, Any]:
    """The committed models as files, for :func:`restore`."""

    def path(model: LoadedModel) -> str | None:
        return None if model.path is None else str(model.path)

    return {
        "generation": generation,
        "served": None if models.served is None else path(models.served),
        "shadow": None if models.shadow is None else [path(models.shadow.served), models.shadow.sample],
        "canary": None if models.canary is None else [path(models.canary.served), models.canary.percent],
    }


async def restore(slot: ModelSlot, settings: Settings, metrics: Metrics, state: dict[str, Any]) -> None:
    """Load what the other workers serve (``models.json``) and adopt its generation. A file that no
    longer loads raises :class:`~service.errors.ModelRejectedError`: the worker cannot join."""

    async def load(path: str, role: str) -> LoadedModel:
        return await prepare_candidate(settings, Path(path), slot, what=f"{role} model of the other workers")

    served = await load(state["served"], "served")
    shadow = (
        None
        if state["shadow"] is None
        else Shadow(await load(state["shadow"][0], "shadow"), state["shadow"][1])
    )
    canary = (
        None
        if state["canary"] is None
        else Canary(await load(state["canary"][0], "canary"), state["canary"][1])
    )
    models = Models(served, shadow, canary)
    slot.adopt(int(state["generation"]), models)
    publish_models(metrics, models, None)
    logger.info("joined the other workers' models", extra={"generation": state["generation"]})


def handler(ctx: AppContext) -> Handler:
    """Answers the siblings' calls (see ``service/cluster.py``)."""

    async def handle(message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        slot = ctx.slot
        if op == "metrics":
            return {"ok": True, "families": families_to_json(ctx.metrics.registry.collect()), **_windows(ctx)}
        if op == "stage":
            async with ctx.reload_lock:
                try:
                    if slot.status == "loading":
                        raise NotReadyError("a worker process is still loading its models; retry")
                    planned = await plan(slot, ctx.settings, Change.from_json(message["change"]))
                except ServiceError as exc:
                    return refusal(exc)
                slot.stage(int(message["ticket"]), planned.models)
            return {"ok": True}
        if op == "drop":
            slot.drop(int(message["ticket"]))
            return {"ok": True}
        if op == "sync":
            models = slot.current()
            versions = {role: m.predictor.metadata.model_version for role, m in loaded_models(models)}
            return {"ok": True, "generation": slot.generation, "versions": versions}
        if op == "forget":
            monitor = ctx.monitor
            if monitor is not None:
                await anyio.to_thread.run_sync(monitor.forget, str(message["user_id"]))
            return {"ok": True}
        return {"ok": False, "status": 400, "code": "unknown_op", "message": f"unknown call {op!r}"}

    return handle


def _windows(ctx: AppContext) -> dict[str, Any]:
    """What the merged PSI, KS and shadow mean are computed from: each version's recent scores,
    and the shadow's signed difference sum and count."""
    windows = {} if ctx.monitor is None else {v: w.tolist() for v, w in ctx.monitor.windows().items()}
    shadow = (
        {}
        if ctx.shadow is None
        else {v: [h.signed, int(h.counts.sum())] for v, h in ctx.shadow.differences()}
    )
    return {"windows": windows, "shadow": shadow}


async def scrape(ctx: AppContext, cluster: Cluster) -> list[Metric]:
    """Every worker's metrics merged (``cluster.merge``), then PSI and KS recomputed over the
    union of the workers' windows and the shadow's mean difference over all its samples: figures a
    gauge mode could only approximate. A version whose reference this worker does not hold (it
    never scored it) keeps the merged value."""
    got: dict[int, dict[str, Any] | BaseException] = dict(await cluster.call_others({"op": "metrics"}))
    got[cluster.index] = {"families": families_to_json(ctx.metrics.registry.collect()), **_windows(ctx)}
    answers: list[dict[str, Any]] = []
    for index in range(cluster.size):  # worker 0 first: the leader's gauges come from it
        answer = got[index]
        if isinstance(answer, BaseException):
            raise answer
        answers.append(answer)
    merged = merge([families_from_json(a["families"]) for a in answers], GAUGE_MODES)
    windows: dict[str, list[float]] = {}
    shadow: dict[str, list[float]] = {}
    for a in answers:
        for version, scores in a["windows"].items():
            windows.setdefault(version, []).extend(scores)
        for version, (signed, count) in a["shadow"].items():
            total = shadow.setdefault(version, [0.0, 0.0])
            total[0] += signed
            total[1] += count
    exact: dict[str, dict[str, float]] = {f"{PREFIX}_score_psi": {}, f"{PREFIX}_score_ks": {}}
    monitor = ctx.monitor
    for version, scores in windows.items():
        state = None if monitor is None else monitor.drift_of(version)
        if state is None or len(scores) < ctx.settings.drift_min_scores:
            continue
        union = np.asarray(scores, dtype=np.float64)
        exact[f"{PREFIX}_score_psi"][version] = psi(state.reference, union)
        exact[f"{PREFIX}_score_ks"][version] = ks(state.reference, union)
    exact[f"{PREFIX}_shadow_mean_score_difference"] = {
        version: signed / count for version, (signed, count) in shadow.items() if count
    }
    for family in merged:
        values = exact.get(family.name)
        if values is None:
            continue
        family.samples = [
            s._replace(value=values[s.labels["model_version"]])
            if s.labels.get("model_version") in values
            else s
            for s in family.samples
        ]
        have = {s.labels.get("model_version") for s in family.samples}
        family.samples += [
            Sample(family.name, {"model_version": v}, x) for v, x in values.items() if v not in have
        ]
    return merged
