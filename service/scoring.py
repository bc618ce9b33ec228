"""Columns -> features -> probabilities: the HTTP-free core of a prediction.

Featurisation is always :func:`service.features.encode_batch` with the served model's own feature
spec, the same call the exporter used to score users offline; that is what makes an online score
and an offline score of the same user at the same ``as_of`` identical.
"""

from __future__ import annotations

import time

import numpy as np
from numpy.typing import NDArray

from service.columns import EventColumns
from service.features import encode_batch
from service.metrics import Metrics
from service.monitor import Monitor
from service.predictor import Predictor


class Scorer:
    """Encodes and scores a batch of users in one inference call, recording what it did (and, with
    a ``monitor``, handing the answers over for drift and outcomes)."""

    def __init__(self, metrics: Metrics, monitor: Monitor | None = None) -> None:
        self._metrics = metrics
        self._monitor = monitor

    def score(self, predictor: Predictor, columns: EventColumns) -> NDArray[np.float32]:
        """``float32 [n_users]`` probabilities, in the order of ``columns``."""
        t0 = time.perf_counter()
        features = encode_batch(
            columns.timestamps,
            columns.amounts,
            columns.quantities,
            columns.offsets,
            columns.as_of,
            predictor.metadata.feature_spec,
            columns.folded,
        )
        t1 = time.perf_counter()
        probabilities = predictor.predict(features)
        t2 = time.perf_counter()
        if probabilities.shape != (columns.n_users,) or not np.all(np.isfinite(probabilities)):
            # Warm-up checked the model on zeros; real inputs are bounded by the schema, so this is
            # a model bug, and a 500 is more honest than a NaN (or null) probability.
            raise RuntimeError(f"model returned {probabilities.shape} non-finite or misshapen output")
        self._metrics.encoding_duration.observe(t1 - t0)
        self._record(probabilities, t2 - t1)
        if self._monitor is not None:
            self._monitor.scored(predictor.metadata, columns, probabilities)
        return probabilities

    def score_features(self, predictor: Predictor, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """``float32 [n]`` for features a caller encoded itself (``[n, bins, channels]``). Not
        handed to the monitor: without the users' events there is no outcome to settle."""
        t0 = time.perf_counter()
        probabilities = predictor.predict(features)
        elapsed = time.perf_counter() - t0
        if probabilities.shape != features.shape[:1] or not np.all(np.isfinite(probabilities)):
            raise RuntimeError(f"model returned {probabilities.shape} non-finite or misshapen output")
        self._record(probabilities, elapsed)
        return probabilities

    def _record(self, probabilities: NDArray[np.float32], inference_seconds: float) -> None:
        m = self._metrics
        n = int(probabilities.size)
        m.inference_duration.observe(inference_seconds)
        m.batch_size.observe(n)
        m.users_scored.inc(n)
        m.probability.observe_many(probabilities)
