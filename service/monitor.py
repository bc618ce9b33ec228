"""Model monitoring: live accuracy from realized outcomes (:mod:`service.outcomes`) and score drift
against the model file's reference (:mod:`service.drift`), per model version.

The request path only hands each scoring call over (:meth:`Monitor.scored`: two appends). Three
periodic tasks do the work in worker threads: the drift update (windows, the decile histogram, PSI
and KS), the flush of recorded predictions to the store, and the outcome job (settle, prune, score
the window). What they find is kept as a snapshot that ``/metrics`` (:class:`MonitorCollector`)
and ``GET /v1/model/performance`` read as is; neither computes anything.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.artifact import ModelMetadata
from service.columns import EventColumns
from service.config import Settings
from service.drift import ScoreReference, ScoreWindow, bin_counts, ks, psi
from service.features import SECONDS_PER_DAY
from service.lifecycle import ModelSlot
from service.metrics import PREFIX, go_float
from service.outcomes import RECORD_RESULTS, SETTLE_OUTCOMES, Recorder, score_window, settle_due
from service.quality import Quality
from service.store import GuardedStore, StoreDownError

logger = logging.getLogger(__name__)


def offline_metrics(meta: ModelMetadata) -> dict[str, float]:
    """The exporter's test-set ROC AUC and Brier from the metadata, where it wrote them."""
    metrics = meta.training_metrics
    test = metrics.get("test", metrics)
    out: dict[str, float] = {}
    if isinstance(test, dict):
        for name in ("roc_auc", "brier"):
            value = test.get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                out[name] = float(value)
    return out


@dataclass
class Drift:
    """One model version's drift state; written only by the drift task."""

    reference: ScoreReference
    window: ScoreWindow
    bucket_counts: NDArray[np.int64]  # since start-up, per reference bin (not cumulative)
    total: float = 0.0  # sum of the scores counted, for the histogram's _sum
    psi: float | None = None
    ks: float | None = None
    #: a copy of the window after the last round, replaced whole: other threads read it (the
    #: worker processes' scrape computes PSI and KS over every worker's window)
    recent: NDArray[np.float64] | None = None


@dataclass(frozen=True)
class Live:
    """The outcome job's last answer: scored windows by version, and where the clocks stood."""

    quality: dict[str, Quality] = field(default_factory=dict)
    event_clock: int | None = None  # latest event time the store has seen
    settled_by: int | None = None  # horizons ending by here are settled (clock minus the grace)
    evaluated_at: float | None = None  # unix time of the round
    unsettled: int = 0
    overdue: int = 0  # unsettled though the wall clock is past their horizon and the grace


class Monitor:
    """Everything the monitoring tasks share; see the module docstring."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        # held from a flush's drain to its write, and by an erasure: a prediction drained before an
        # erasure cannot be written after it
        self._flush_lock = threading.Lock()
        self._models: OrderedDict[str, ModelMetadata] = OrderedDict()  # most recently served last
        self._scores: deque[tuple[str, NDArray[np.float32]]] = deque()
        self._pending_scores = 0
        self._drift_on = settings.drift
        # a drift round that falls behind loses scores (counted) rather than memory
        self._max_pending_scores = max(100 * settings.drift_window_scores, 1_000_000)
        self._drift: dict[str, Drift] = {}
        self.live = Live()
        self.recorder = (
            Recorder(sample_rate=settings.outcomes_sample_rate, max_users=settings.outcomes_buffer_users)
            if settings.records_outcomes
            else None
        )
        p = PREFIX
        self.recorded = Counter(
            f"{p}_outcome_predictions",
            "Served predictions by what became of them on the way to the store: recorded, duplicate "
            "(that user, version and day was already recorded), sampled_out, dropped (buffer full or "
            "store down).",
            ["result"],
            registry=registry,
        )
        self.settled = Counter(
            f"{p}_outcome_settled",
            "Recorded predictions settled once their horizon passed, by outcome: positive, negative, "
            "unobserved (the user is unknown to the store), compacted (purchases in the horizon were "
            "already folded).",
            ["outcome"],
            registry=registry,
        )
        self.dropped_scores = Counter(
            f"{p}_drift_dropped_scores",
            "Scores left out of the drift windows and histogram because the drift task fell behind.",
            registry=registry,
        )
        for result in RECORD_RESULTS:
            self.recorded.labels(result)
        for outcome in SETTLE_OUTCOMES.values():
            self.settled.labels(outcome)
        registry.register(MonitorCollector(self))

    # ---- the request path -------------------------------------------------------------------

    def scored(self, meta: ModelMetadata, columns: EventColumns, probabilities: NDArray[np.float32]) -> None:
        """Hand over one scoring call (called for every inference; keep it cheap)."""
        version = meta.model_version
        if version not in self._models:
            self.track(meta)
        if self._drift_on:
            with self._lock:
                if self._pending_scores < self._max_pending_scores:
                    self._scores.append((version, probabilities))
                    self._pending_scores += probabilities.size
                else:
                    self.dropped_scores.inc(probabilities.size)
        if self.recorder is not None:
            dropped = self.recorder.add(version, meta.horizon_days, columns, probabilities, time.time())
            if dropped:
                self.recorded.labels("dropped").inc(dropped)

    # ---- model versions ---------------------------------------------------------------------

    def track(self, meta: ModelMetadata) -> None:
        """Note a version this process serves; only the most recent few keep series."""
        s = self.settings
        needed = meta.horizon_days + s.outcomes_window_days + s.outcomes_grace_seconds / SECONDS_PER_DAY
        if (
            self.recorder is not None
            and meta.model_version not in self._models
            and s.outcomes_retention_days < needed
        ):
            logger.warning(
                "PI_OUTCOMES_RETENTION_DAYS is shorter than the model's horizon plus the outcome window: "
                "predictions are deleted before they can count",
                extra={"model_version": meta.model_version, "retention_days": s.outcomes_retention_days},
            )
        with self._lock:
            self._models[meta.model_version] = meta
            self._models.move_to_end(meta.model_version)
            while len(self._models) > self.settings.monitor_max_versions:
                gone, _ = self._models.popitem(last=False)
                self._drift.pop(gone, None)

    def models(self) -> list[ModelMetadata]:
        with self._lock:
            return list(self._models.values())

    def drift_of(self, version: str) -> Drift | None:
        return self._drift.get(version)

    def windows(self) -> dict[str, NDArray[np.float64]]:
        """Each version's recent scores as of the last drift round."""
        return {v: state.recent for v, state in list(self._drift.items()) if state.recent is not None}

    # ---- the periodic work (worker threads) -------------------------------------------------

    def update_drift(self) -> None:
        """New scores into each version's window and histogram, then PSI and KS."""
        with self._lock:
            batches, self._scores = self._scores, deque()
            self._pending_scores = 0
            models = dict(self._models)
        by_version: dict[str, list[NDArray[np.float32]]] = {}
        for version, scores in batches:
            by_version.setdefault(version, []).append(scores)
        for version, meta in models.items():
            reference = meta.score_reference
            if reference is None:  # an older file: no reference, so no drift series for it
                continue
            state = self._drift.get(version)
            if state is None:
                state = Drift(
                    reference,
                    ScoreWindow(self.settings.drift_window_scores),
                    np.zeros(len(reference.edges) + 1, np.int64),
                )
                self._drift[version] = state
            parts = by_version.get(version)
            if not parts:
                continue
            new: NDArray[np.float64] = np.concatenate(parts).astype(np.float64)
            state.window.extend(new)
            state.bucket_counts += bin_counts(reference, new)
            state.total += float(new.sum())
            state.recent = state.window.values().copy()
            if len(state.window) >= self.settings.drift_min_scores:
                window = state.window.values()
                state.psi, state.ks = psi(reference, window), ks(reference, window)
        with self._lock:  # versions evicted meanwhile keep no window
            for version in [v for v in self._drift if v not in self._models]:
                del self._drift[version]

    def flush(self, store: GuardedStore) -> None:
        """Write the buffered predictions (sampled, one per user, version and day) in one call."""
        assert self.recorder is not None
        with self._flush_lock:
            drained = self.recorder.drain()
            self.recorded.labels("sampled_out").inc(drained.sampled_out)
            self.recorded.labels("duplicate").inc(drained.duplicates)
            if not drained.predictions:
                return
            try:
                result = store.record(drained.predictions)
            except StoreDownError:
                self.recorded.labels("dropped").inc(len(drained.predictions))
                raise
        self.recorded.labels("recorded").inc(result.stored)
        self.recorded.labels("duplicate").inc(result.duplicates)

    def erase(self, store: GuardedStore, user_id: str) -> int:
        """Forget the user in the store and in the buffer of predictions not yet written; returns
        the raw events deleted. Blocks: call it in a worker thread."""
        with self._flush_lock:
            if self.recorder is not None:
                self.recorder.forget(user_id)
            return store.erase(user_id)

    def forget(self, user_id: str) -> None:
        """Drop the user's predictions buffered for recording (an erasure answered by another worker
        process). Blocks: call it in a worker thread."""
        with self._flush_lock:
            if self.recorder is not None:
                self.recorder.forget(user_id)

    def evaluate(self, store: GuardedStore, now: float) -> None:
        """One round of the outcome job: settle what is due, prune, score the window."""
        s = self.settings
        clock = store.event_clock()
        live = Live(event_clock=clock, evaluated_at=now)
        if clock is not None:
            settled_by = min(clock, int(now)) - s.outcomes_grace_seconds
            counts = settle_due(store, settled_by)
            for outcome, n in counts.items():
                self.settled.labels(SETTLE_OUTCOMES[outcome]).inc(n)
            window_start = settled_by - s.outcomes_window_days * SECONDS_PER_DAY
            store.prune(window_start, now - s.outcomes_retention_days * SECONDS_PER_DAY)
            window = store.settled(window_start, settled_by)
            live = Live(
                quality=score_window(window.probabilities, window.outcomes),
                event_clock=clock,
                settled_by=settled_by,
                evaluated_at=now,
            )
        backlog = store.backlog(int(now) - s.outcomes_grace_seconds)
        self.live = Live(
            live.quality,
            live.event_clock,
            live.settled_by,
            live.evaluated_at,
            backlog.unsettled,
            backlog.overdue,
        )


async def _every(
    interval: float, work: Callable[[], None], limiter: anyio.CapacityLimiter, what: str
) -> None:
    while True:
        await anyio.sleep(interval)
        started = time.perf_counter()
        try:
            await anyio.to_thread.run_sync(work, limiter=limiter)
        except StoreDownError:
            continue  # GuardedStore logged it; readiness and purchase_intent_store_up report it
        except Exception:
            logger.exception(f"model monitoring: the {what} round failed")
            continue
        logger.debug(f"model monitoring: {what} round", extra={"seconds": time.perf_counter() - started})


async def watch(
    monitor: Monitor, slot: ModelSlot, store: GuardedStore | None, *, settle: bool = True
) -> None:
    """The monitoring tasks, until cancelled. They take one thread of their own, so they never
    queue behind requests for the prediction or store threads. ``settle=False`` leaves the outcome
    job to another worker process (one per service settles the shared store)."""
    s = monitor.settings
    limiter = anyio.CapacityLimiter(1)

    def drift_round() -> None:
        served = slot.served
        if served is not None:
            monitor.track(served.predictor.metadata)
        monitor.update_drift()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_every, s.drift_interval_seconds, drift_round, limiter, "drift")
        if store is not None and monitor.recorder is not None:
            tasks.start_soon(_every, s.outcomes_flush_seconds, lambda: monitor.flush(store), limiter, "flush")
        if store is not None and monitor.recorder is not None and settle:
            evaluate = lambda: monitor.evaluate(store, time.time())  # noqa: E731
            tasks.start_soon(_every, s.outcomes_interval_seconds, evaluate, limiter, "outcome")


def _labels(version: str) -> list[str]:
    return [version]


class MonitorCollector(Collector):
    """The monitor's snapshot as Prometheus series, for the versions it tracks (a bounded set)."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def describe(self) -> list[Metric]:
        return []  # the series depend on what the tasks found: collected fresh each scrape

    def collect(self) -> Iterator[Metric]:
        m = self._monitor
        s = m.settings
        p = PREFIX
        models = m.models()
        versions = [meta.model_version for meta in models]
        yield from self._offline(models)
        if m.recorder is not None:
            yield from self._live(versions)
            margin = GaugeMetricFamily(
                f"{p}_live_roc_auc_margin",
                "How far live ROC AUC may fall below the offline AUC before the alert fires "
                "(PI_OUTCOMES_AUC_MARGIN).",
            )
            margin.add_metric([], s.outcomes_auc_margin)
            yield margin
        if s.drift:
            yield from self._drift(versions)
            threshold = GaugeMetricFamily(
                f"{p}_score_psi_threshold", "PSI above which the drift alert fires (PI_DRIFT_PSI_THRESHOLD)."
            )
            threshold.add_metric([], s.drift_psi_threshold)
            yield threshold

    def _offline(self, models: list[ModelMetadata]) -> Iterator[Metric]:
        p = PREFIX
        auc = GaugeMetricFamily(
            f"{p}_model_offline_roc_auc", "ROC AUC on the exporter's test users.", labels=["model_version"]
        )
        brier = GaugeMetricFamily(
            f"{p}_model_offline_brier_score",
            "Brier score on the exporter's test users.",
            labels=["model_version"],
        )
        for meta in models:
            offline = offline_metrics(meta)
            if "roc_auc" in offline:
                auc.add_metric(_labels(meta.model_version), offline["roc_auc"])
            if "brier" in offline:
                brier.add_metric(_labels(meta.model_version), offline["brier"])
        yield auc
        yield brier

    def _live(self, versions: list[str]) -> Iterator[Metric]:
        p = PREFIX
        live = self._monitor.live
        label = ["model_version"]
        matured = GaugeMetricFamily(
            f"{p}_live_matured_predictions",
            "Settled predictions with a known outcome whose horizon ended within the window.",
            labels=label,
        )
        gauges = {
            "roc_auc": GaugeMetricFamily(
                f"{p}_live_roc_auc", "ROC AUC of the matured predictions.", labels=label
            ),
            "brier": GaugeMetricFamily(
                f"{p}_live_brier_score", "Brier score of the matured predictions.", labels=label
            ),
            "log_loss": GaugeMetricFamily(
                f"{p}_live_log_loss", "Log loss of the matured predictions.", labels=label
            ),
            "base_rate": GaugeMetricFamily(
                f"{p}_live_base_rate", "Share of the matured predictions' users who bought.", labels=label
            ),
            "mean_predicted": GaugeMetricFamily(
                f"{p}_live_mean_probability", "Mean probability of the matured predictions.", labels=label
            ),
        }
        decile_labels = ["model_version", "decile"]
        observed = GaugeMetricFamily(
            f"{p}_live_calibration_observed_rate",
            "Share who bought, per decile of the matured predictions' probability.",
            labels=decile_labels,
        )
        predicted = GaugeMetricFamily(
            f"{p}_live_calibration_mean_probability",
            "Mean probability per decile of the matured predictions' probability.",
            labels=decile_labels,
        )
        for version in versions:
            q = live.quality.get(version)
            matured.add_metric(_labels(version), 0 if q is None else q.count)
            if q is None:
                continue
            for name, gauge in gauges.items():
                value = float(getattr(q, name))
                if math.isfinite(value):  # AUC is NaN until both outcomes have been seen
                    gauge.add_metric(_labels(version), value)
            for group in q.calibration:
                observed.add_metric([version, str(group.decile)], group.observed_rate)
                predicted.add_metric([version, str(group.decile)], group.mean_predicted)
        yield matured
        yield from gauges.values()
        yield observed
        yield predicted
        clock = GaugeMetricFamily(
            f"{p}_outcome_clock_timestamp_seconds",
            "The event clock: the latest event time the store has seen (outcomes settle by it).",
        )
        if live.event_clock is not None:
            clock.add_metric([], live.event_clock)
        yield clock
        evaluated = GaugeMetricFamily(
            f"{p}_outcome_evaluation_timestamp_seconds", "Unix time of the outcome job's last complete round."
        )
        if live.evaluated_at is not None:
            evaluated.add_metric([], live.evaluated_at)
        yield evaluated
        unsettled = GaugeMetricFamily(
            f"{p}_outcome_unsettled_predictions", "Recorded predictions whose outcome is not known yet."
        )
        unsettled.add_metric([], live.unsettled)
        yield unsettled
        overdue = GaugeMetricFamily(
            f"{p}_outcome_overdue_predictions",
            "Unsettled predictions whose horizon and grace ended by the wall clock: the event clock lags.",
        )
        overdue.add_metric([], live.overdue)
        yield overdue

    def _drift(self, versions: list[str]) -> Iterator[Metric]:
        p = PREFIX
        m = self._monitor
        label = ["model_version"]
        psi_gauge = GaugeMetricFamily(
            f"{p}_score_psi", "PSI of the recent scores against the model's reference deciles.", labels=label
        )
        ks_gauge = GaugeMetricFamily(
            f"{p}_score_ks",
            "Kolmogorov-Smirnov statistic of the recent scores against the reference.",
            labels=label,
        )
        size = GaugeMetricFamily(f"{p}_score_window_size", "Recent scores held for drift.", labels=label)
        histogram = HistogramMetricFamily(
            f"{p}_score_deciles",
            "Served scores in the buckets of the model's reference deciles.",
            labels=label,
        )
        reference = GaugeMetricFamily(
            f"{p}_score_reference_proportion",
            "Share of the model's evaluation users in each reference bin (lower, upper]; `upper`, "
            "not `le`, which Prometheus keeps for histograms (deploy/rules.yml maps it onto `le`).",
            labels=["model_version", "upper", "lower"],
        )
        for version in versions:
            state = m.drift_of(version)
            if state is None:
                continue
            size.add_metric(_labels(version), len(state.window))
            if state.psi is not None and state.ks is not None:
                psi_gauge.add_metric(_labels(version), state.psi)
                ks_gauge.add_metric(_labels(version), state.ks)
            ref = state.reference
            bounds = [go_float(e) for e in ref.edges] + ["+Inf"]
            cumulative = np.cumsum(state.bucket_counts)
            histogram.add_metric(
                _labels(version),
                [(b, float(c)) for b, c in zip(bounds, cumulative, strict=True)],
                state.total,
            )
            lowers = ["", *bounds[:-1]]
            for le, lower, share in zip(bounds, lowers, ref.proportions, strict=True):
                reference.add_metric([version, le, lower], share)
        yield psi_gauge
        yield ks_gauge
        yield size
        yield histogram
        yield reference


def report_versions(monitor: Monitor, only: str | None, served: ModelMetadata | None) -> list[str] | None:
    """The versions ``GET /v1/model/performance`` reports: the served one, the tracked ones, then
    any other with settled predictions in the window; ``None`` when ``only`` is none of them."""
    if served is not None:
        monitor.track(served)
    versions = [meta.model_version for meta in monitor.models()]
    versions += [v for v in sorted(monitor.live.quality) if v not in versions]
    if only is None:
        return versions
    return [only] if only in versions else None
