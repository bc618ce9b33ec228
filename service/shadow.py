"""The shadow model's scoring, off the request path.

The scorer offers each scoring call of the served model (:meth:`ShadowScorer.offer`: a sampling
draw and a non-blocking put); a thread of its own scores the sampled calls on the shadow model
later, so an answer is sent before its shadow score exists and can never depend on it. A full
queue drops the call, counted: a slow shadow costs coverage, not latency. The difference from the
served score goes to a histogram; the shadow's scores go to the monitor like any model's, which
gives it drift and live-quality series of its own under its version.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.columns import EventColumns
from service.lifecycle import ModelSlot, Shadow
from service.metrics import PREFIX, go_float
from service.monitor import Monitor
from service.predictor import Predictor
from service.scoring import check_output, encode

logger = logging.getLogger(__name__)

#: ``|shadow - served|`` probability per user: fine near zero, where a retrained model that agrees
#: with the served one puts nearly everything. (Absolute: a histogram with negative buckets has no
#: ``_sum`` or ``_count`` in the exposition format; the signed mean is a gauge of its own.)
DIFFERENCE_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
#: ``purchase_intent_shadow_calls_total`` results.
SHADOW_RESULTS: tuple[str, ...] = ("scored", "dropped", "failed")


@dataclass(frozen=True)
class _Call:
    shadow: Shadow  # the shadow loaded when the call was offered
    columns: EventColumns
    served: NDArray[np.float32]  # what the served model answered


class _Differences:
    """One shadow version's difference histogram (whole arrays in, like ``ArrayHistogram``)."""

    def __init__(self) -> None:
        self.upper = np.asarray(DIFFERENCE_BUCKETS, dtype=np.float64)
        self.counts = np.zeros(len(DIFFERENCE_BUCKETS) + 1, dtype=np.int64)
        self.total = 0.0  # of the absolute differences
        self.signed = 0.0

    def observe_many(self, values: NDArray[np.float64]) -> None:
        absolute = np.abs(values)
        bins = np.searchsorted(self.upper, absolute, side="left")  # le: a bound's value is in its bucket
        self.counts += np.bincount(bins, minlength=self.counts.size)
        self.total += float(absolute.sum())
        self.signed += float(values.sum())

    def copy(self) -> _Differences:
        out = _Differences()
        out.counts, out.total, out.signed = self.counts.copy(), self.total, self.signed
        return out


class ShadowScorer:
    """See the module docstring. ``start`` and ``stop`` belong to the app's lifespan."""

    def __init__(
        self,
        slot: ModelSlot,
        registry: CollectorRegistry,
        *,
        queue_size: int,
        monitor: Monitor | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._slot = slot
        self._monitor = monitor
        self._draw = draw
        self._queue: queue.Queue[_Call | None] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._differences: dict[str, _Differences] = {}
        self.calls = Counter(
            f"{PREFIX}_shadow_calls",
            "Scoring calls sampled for the shadow model, by result: scored, dropped (its queue was "
            "full), failed (the shadow model raised; logged).",
            ["result"],
            registry=registry,
        )
        for result in SHADOW_RESULTS:
            self.calls.labels(result)
        registry.register(_DifferenceCollector(self))

    # ---- the request path -------------------------------------------------------------------

    def offer(self, predictor: Predictor, columns: EventColumns, probabilities: NDArray[np.float32]) -> None:
        """Queue a scoring call for the shadow, if one is loaded and the draw picks it."""
        shadow = self._slot.shadow
        if shadow is None:
            return
        served = self._slot.served
        # the served model's calls only: a canary's users, or a request still finishing on a model
        # just swapped out, would compare the shadow with something else
        if served is None or served.predictor is not predictor:
            return
        if shadow.sample < 1.0 and self._draw() >= shadow.sample:
            return
        try:
            self._queue.put_nowait(_Call(shadow, columns, probabilities))
        except queue.Full:
            self.calls.labels("dropped").inc()

    # ---- the shadow thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the call being scored (blocking: run it in a worker thread); the rest of the
        queue is left unscored."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes an idle thread; a busy one sees the flag
        if self._thread is not None:
            self._thread.join(timeout)

    def pending(self) -> int:
        """Calls queued or being scored."""
        return self._queue.unfinished_tasks

    def _run(self) -> None:
        while not self._stopping.is_set():
            call = self._queue.get()
            try:
                if call is None:
                    return
                self._score(call)
            except Exception:
                logger.exception("the shadow model failed to score a call; answers are unaffected")
                self.calls.labels("failed").inc()
            finally:
                self._queue.task_done()

    def _score(self, call: _Call) -> None:
        predictor = call.shadow.served.predictor
        columns = call.columns
        probabilities = predictor.predict(encode(columns, predictor))
        check_output(probabilities, columns.n_users)
        version = predictor.metadata.model_version
        difference = probabilities.astype(np.float64) - call.served.astype(np.float64)
        with self._lock:
            histogram = self._differences.get(version)
            if histogram is None:
                histogram = self._differences[version] = _Differences()
            histogram.observe_many(difference)
        if self._monitor is not None:
            self._monitor.scored(predictor.metadata, columns, probabilities)
        self.calls.labels("scored").inc()

    def differences(self) -> list[tuple[str, _Differences]]:
        """The loaded shadow's histogram (a copy); those of shadows since unloaded are dropped, so
        the version label only ever names a loaded model."""
        shadow = self._slot.shadow
        loaded = None if shadow is None else shadow.served.predictor.metadata.model_version
        with self._lock:
            for version in [v for v in self._differences if v != loaded]:
                del self._differences[version]
            return [(version, h.copy()) for version, h in self._differences.items()]


class _DifferenceCollector(Collector):
    def __init__(self, shadow: ShadowScorer) -> None:
        self._shadow = shadow

    def describe(self) -> list[Metric]:
        return []  # labelled by whichever shadow is loaded: collected fresh each scrape

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            f"{PREFIX}_shadow_score_difference",
            "How far the shadow model's probability is from the served model's (absolute), per user "
            "of the sampled calls.",
            labels=["model_version"],
        )
        mean = GaugeMetricFamily(
            f"{PREFIX}_shadow_mean_score_difference",
            "Mean of the shadow model's probability minus the served model's over the sampled users "
            "since it was loaded: above 0, the shadow scores higher.",
            labels=["model_version"],
        )
        bounds = [go_float(b) for b in DIFFERENCE_BUCKETS] + ["+Inf"]
        for version, h in self._shadow.differences():
            cumulative = np.cumsum(h.counts)
            family.add_metric(
                [version], [(b, float(c)) for b, c in zip(bounds, cumulative, strict=True)], h.total
            )
            if cumulative[-1]:
                mean.add_metric([version], h.signed / float(cumulative[-1]))
        yield family
        yield mean
