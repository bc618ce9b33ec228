"""Prometheus metrics on a registry that is passed in (tests use a fresh one each, no global state).

Naming: one ``purchase_intent_`` prefix, base units, counters end in ``_total``. Labels come from
closed sets fixed at start-up: route *templates* (one ``unmatched`` value for anything else, so a
scanner's 404s cannot explode cardinality), status classes, rejection reasons; never a user id, a
raw path or an error message.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.cluster import GaugeMode

go_float = cast(Callable[[float], str], floatToGoString)  # how client_python prints `le`

PREFIX = "purchase_intent"
UNMATCHED_ROUTE = "unmatched"

#: Users per onnxruntime call: powers of two cover the padded batch shapes.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(1 << k) for k in range(14))  # 1 .. 8192
#: Predicted probabilities in 0.05 steps, fine enough to see the distribution drift.
PROBABILITY_BUCKETS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 21))


class ArrayHistogram(Collector):
    """A histogram fed whole numpy arrays: a batch's probabilities cost one ``searchsorted``, not
    one ``observe()`` call taking a lock per user. Exposed exactly like a prometheus_client
    histogram (cumulative ``_bucket``, ``_count``, ``_sum``)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._upper = np.asarray(buckets, dtype=np.float64)
        self._bounds = self._upper.tolist()
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: NDArray[np.floating] | Sequence[float]) -> None:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        # side="left": a value equal to a bound belongs to that bound's bucket (le = "<=")
        counts = np.bincount(np.searchsorted(self._upper, arr, side="left"), minlength=self._counts.size)
        total = float(arr.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def observe(self, value: float) -> None:
        """One finite value, counted as :meth:`observe_many` counts it, without its numpy calls."""
        index = bisect.bisect_left(self._bounds, value)  # bisect_left: searchsorted's side="left"
        with self._lock:
            self._counts[index] += 1
            self._sum += float(value)

    def _family(self, with_samples: bool) -> HistogramMetricFamily:
        if not with_samples:
            return HistogramMetricFamily(self._name, self._documentation)
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        bounds = [go_float(float(b)) for b in self._upper] + ["+Inf"]
        return HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=[(b, float(c)) for b, c in zip(bounds, cumulative, strict=True)],
            sum_value=total,
        )

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return [self._family(with_samples=False)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        yield self._family(with_samples=True)


class Metrics:
    """Every metric the service exports, registered on ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        latency_buckets: Sequence[float],
        reject_reasons: Sequence[str],
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry
        p = PREFIX
        self.requests = Counter(
            f"{p}_requests",
            "HTTP requests answered, by route template and status class.",
            ["route", "status_class"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds",
            "Time from request start to the last response byte, by route template.",
            ["route"],
            buckets=latency_buckets,
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{p}_requests_in_flight", "HTTP requests being processed now.", registry=registry
        )
        self.rejected = Counter(
            f"{p}_rejected_requests",
            "Requests refused with a 4xx/5xx error body, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in reject_reasons:
            self.rejected.labels(reason)  # export every reason at 0 so rate() works from the start
        self.encoding_duration = Histogram(
            f"{p}_encoding_duration_seconds",
            "Featurisation time per inference call (events to tensor).",
            buckets=latency_buckets,
            registry=registry,
        )
        self.inference_duration = Histogram(
            f"{p}_inference_duration_seconds",
            "onnxruntime time per inference call (padding included).",
            buckets=latency_buckets,
            registry=registry,
        )
        self.batch_queue_duration = ArrayHistogram(
            f"{p}_batch_queue_duration_seconds",
            "Time a /predict request waited in the micro-batch queue before its batch was scored "
            "(separate from encoding and inference time).",
            latency_buckets,
        )
        registry.register(self.batch_queue_duration)
        self.batch_size = Histogram(
            f"{p}_batch_size",
            "Users per inference call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.users_scored = Counter(f"{p}_users_scored", "Users given a probability.", registry=registry)
        self.probability = ArrayHistogram(
            f"{p}_predicted_probability",
            "Predicted purchase probabilities, one observation per user scored (watch it for drift).",
            PROBABILITY_BUCKETS,
        )
        registry.register(self.probability)
        self.model_info = Gauge(
            f"{p}_model_info",
            "1 for the model being served, labelled with its version and active execution provider.",
            ["model_version", "provider"],
            registry=registry,
        )
        self.provider_fallback = Gauge(
            f"{p}_model_provider_fallback",
            "1 when onnxruntime silently fell back from the first execution provider asked for.",
            registry=registry,
        )
        self.model_load_duration = Gauge(
            f"{p}_model_load_duration_seconds",
            "Time the served model took to load, validate and warm up.",
            registry=registry,
        )
        self.model_load_timestamp = Gauge(
            f"{p}_model_load_timestamp_seconds",
            "Unix time the served model became ready.",
            registry=registry,
        )
        self.model_reloads = Counter(
            f"{p}_model_reloads",
            "Model hot-swap attempts by result: success (swapped in) or failure (refused, the old "
            "model kept serving).",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.model_reloads.labels(result)
        self.loaded_models = Gauge(
            f"{p}_loaded_model_info",
            "1 per loaded model, labelled with its role (primary, shadow or canary) and version.",
            ["role", "model_version"],
            registry=registry,
        )
        self.canary_users = Counter(
            f"{p}_canary_users_scored",
            "Users answered by the canary model (counted in users_scored too).",
            registry=registry,
        )
        self.ready = Gauge(
            f"{p}_ready", "1 when the service is ready to predict (what /readyz reports).", registry=registry
        )
        if process_metrics:
            ProcessCollector(registry=registry)  # process_resident_memory_bytes etc.

    def set_model(
        self, *, version: str, provider: str, fallback: bool, load_seconds: float, loaded_at: float
    ) -> None:
        """Point the model gauges at a newly served model (replacing the previous one's labels)."""
        self.model_info.clear()
        self.model_info.labels(version, provider).set(1)
        self.provider_fallback.set(1 if fallback else 0)
        self.model_load_duration.set(load_seconds)
        self.model_load_timestamp.set(loaded_at)

    def set_loaded(self, models: Iterable[tuple[str, str]]) -> None:
        """Point the loaded-model gauge at ``(role, version)`` pairs: only loaded models keep a series."""
        self.loaded_models.clear()
        for role, version in models:
            self.loaded_models.labels(role, version).set(1)


#: How each gauge's values from several worker processes become one (``service/cluster.py``):
#: ``sum`` for what each worker holds a part of, ``min`` where every worker must agree (ready),
#: ``max`` for what all workers share (the loaded models), ``leader`` for what only worker 0
#: computes (the outcome job over the shared store). PSI, KS and the shadow's mean difference are
#: then recomputed from every worker's scores (``siblings.scrape``); ``max`` stands only for a
#: version the answering worker holds no reference of. Counters and histograms are summed. A gauge
#: missing here fails the scrape, and the tests that scrape every metric.
GAUGE_MODES: dict[str, GaugeMode] = {
    **dict.fromkeys(
        [
            f"{PREFIX}_requests_in_flight",
            f"{PREFIX}_score_window_size",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
        ],
        "sum",
    ),
    **dict.fromkeys([f"{PREFIX}_ready", f"{PREFIX}_store_up", "process_start_time_seconds"], "min"),
    **dict.fromkeys(
        [
            f"{PREFIX}_model_info",
            f"{PREFIX}_loaded_model_info",
            f"{PREFIX}_model_load_duration_seconds",
            f"{PREFIX}_model_load_timestamp_seconds",
            f"{PREFIX}_model_provider_fallback",
            f"{PREFIX}_model_offline_roc_auc",
            f"{PREFIX}_model_offline_brier_score",
            f"{PREFIX}_live_roc_auc_margin",
            f"{PREFIX}_score_psi",
            f"{PREFIX}_score_ks",
            f"{PREFIX}_score_deciles",
            f"{PREFIX}_score_psi_threshold",
            f"{PREFIX}_score_reference_proportion",
            f"{PREFIX}_shadow_mean_score_difference",
            "process_max_fds",
        ],
        "max",
    ),
    **dict.fromkeys(
        [
            f"{PREFIX}_live_matured_predictions",
            f"{PREFIX}_live_roc_auc",
            f"{PREFIX}_live_brier_score",
            f"{PREFIX}_live_log_loss",
            f"{PREFIX}_live_base_rate",
            f"{PREFIX}_live_mean_probability",
            f"{PREFIX}_live_calibration_observed_rate",
            f"{PREFIX}_live_calibration_mean_probability",
            f"{PREFIX}_outcome_clock_timestamp_seconds",
            f"{PREFIX}_outcome_evaluation_timestamp_seconds",
            f"{PREFIX}_outcome_unsettled_predictions",
            f"{PREFIX}_outcome_overdue_predictions",
        ],
        "leader",
    ),
}
