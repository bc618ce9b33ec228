"""Columns -> features -> probabilities: the HTTP-free core of a prediction.

Featurisation is always :func:`service.features.encode_batch` with the served model's own feature
spec, the same call the exporter used to score users offline; that is what makes an online score
and an offline score of the same user at the same ``as_of`` identical. A lone user with a short
history is encoded by :func:`service.features.encode_one`, the same encoder's one-user form, which
gives the same tensor for a fraction of the fixed cost.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from service.columns import EventColumns
from service.features import ONE_USER_MAX_EVENTS, encode_batch, encode_one
from service.metrics import Metrics
from service.monitor import Monitor
from service.predictor import Predictor

if TYPE_CHECKING:  # shadow.py scores with this module's encode()
    from service.shadow import ShadowScorer


class Scorer:
    """Encodes and scores a batch of users in one inference call, recording what it did (and, with
    a ``monitor``, handing the answers over for drift and outcomes; with a ``shadow``, offering the
    call to the shadow model, which scores it later on its own thread)."""

    def __init__(
        self, metrics: Metrics, monitor: Monitor | None = None, shadow: ShadowScorer | None = None
    ) -> None:
        self._metrics = metrics
        self._monitor = monitor
        self._shadow = shadow

    def score(self, predictor: Predictor, columns: EventColumns) -> NDArray[np.float32]:
        """``float32 [n_users]`` probabilities, in the order of ``columns``."""
        t0 = time.perf_counter()
        features = encode(columns, predictor)
        t1 = time.perf_counter()
        probabilities = predictor.predict(features)
        t2 = time.perf_counter()
        check_output(probabilities, columns.n_users)
        self._metrics.encoding_duration.observe(t1 - t0)
        self._record(probabilities, t2 - t1)
        if self._monitor is not None:
            self._monitor.scored(predictor.metadata, columns, probabilities)
        if self._shadow is not None:
            self._shadow.offer(predictor, columns, probabilities)
        return probabilities

    def score_features(self, predictor: Predictor, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """``float32 [n]`` for features a caller encoded itself (``[n, bins, channels]``). Not
        handed to the monitor: without the users' events there is no outcome to settle."""
        t0 = time.perf_counter()
        probabilities = predictor.predict(features)
        elapsed = time.perf_counter() - t0
        check_output(probabilities, features.shape[0])
        self._record(probabilities, elapsed)
        return probabilities

    def _record(self, probabilities: NDArray[np.float32], inference_seconds: float) -> None:
        m = self._metrics
        n = int(probabilities.size)
        m.inference_duration.observe(inference_seconds)
        m.batch_size.observe(n)
        m.users_scored.inc(n)
        if n == 1:
            m.probability.observe(float(probabilities[0]))
        else:
            m.probability.observe_many(probabilities)


def encode(columns: EventColumns, predictor: Predictor) -> NDArray[np.float32]:
    """``columns`` as ``predictor``'s input tensor, by its own feature spec."""
    spec = predictor.metadata.feature_spec
    if columns.n_users == 1 and columns.folded is None and columns.timestamps.size <= ONE_USER_MAX_EVENTS:
        return encode_one(
            columns.timestamps.tolist(),
            columns.amounts.tolist(),
            columns.quantities.tolist(),
            int(columns.as_of[0]),
            spec,
        )
    return encode_batch(
        columns.timestamps,
        columns.amounts,
        columns.quantities,
        columns.offsets,
        columns.as_of,
        spec,
        columns.folded,
    )


def check_output(probabilities: NDArray[np.float32], n_users: int) -> None:
    if probabilities.shape != (n_users,) or not (
        math.isfinite(probabilities[0]) if n_users == 1 else np.all(np.isfinite(probabilities))
    ):
        # Warm-up checked the model on zeros; real inputs are bounded by the schema, so this is
        # a model bug, and a 500 is more honest than a NaN (or null) probability.
        raise RuntimeError(f"model returned {probabilities.shape} non-finite or misshapen output")
