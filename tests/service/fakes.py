"""A predictor that follows the real protocol without onnxruntime, for API tests through the factory."""

from __future__ import annotations

import threading

import numpy as np
from numpy.typing import NDArray

from service.artifact import ArtifactError, ModelMetadata
from service.drift import ScoreReference
from service.features import FeatureSpec
from service.predictor import RuntimeInfo, batch_sizes

SPEC = FeatureSpec(lookback_bins=8, bin_days=7, channels=("purchases", "log_spend", "active"))


def make_metadata(
    spec: FeatureSpec = SPEC,
    version: str = "synthetic-1",
    threshold: float = 0.5,
    score_reference: ScoreReference | None = None,
) -> ModelMetadata:
    return ModelMetadata(
        model_version=version,
        created_at="2024-01-01T00:00:00Z",
        feature_spec=spec,
        threshold=threshold,
        horizon_weeks=4,
        protocol="customer-split",
        cutoff="1997-09-30",
        data_fingerprint="0" * 64,
        training_metrics={"roc_auc": 0.5},
        opset=18,
        score_reference=score_reference,
    )


def reference_probability(features: NDArray[np.float32]) -> NDArray[np.float32]:
    """``sigmoid(mean over time and channels - 0.5)``: what the fake and the synthetic graph compute."""
    mean = features.astype(np.float32).mean(axis=(1, 2), dtype=np.float32)
    return np.asarray(1.0 / (1.0 + np.exp(-(mean - np.float32(0.5)))), dtype=np.float32)


class FakePredictor:
    """Scores with :func:`reference_probability`; records each call's batch size and thread.

    ``gate``: warm-up blocks until it is set (to observe "loading"); ``error``: ``predict`` raises it;
    ``predict_gate``: ``predict`` blocks until it is set (to hold requests in flight), releasing
    ``entered`` once per call first.
    """

    def __init__(
        self,
        *,
        version: str = "fake-1",
        threshold: float = 0.5,
        requested: tuple[str, ...] = ("CPUExecutionProvider",),
        active: tuple[str, ...] = ("CPUExecutionProvider",),
        max_batch: int = 8,
        gate: threading.Event | None = None,
        warm_up_error: Exception | None = None,
        error: Exception | None = None,
        predict_gate: threading.Event | None = None,
        metadata: ModelMetadata | None = None,
    ) -> None:
        self._metadata = (
            metadata if metadata is not None else make_metadata(version=version, threshold=threshold)
        )
        self._runtime = RuntimeInfo(requested=requested, active=active, batch_sizes=batch_sizes(max_batch))
        self.gate = gate
        self.warm_up_error = warm_up_error
        self.error = error
        self.predict_gate = predict_gate
        self.entered = threading.Semaphore(0)
        self.calls: list[int] = []
        self.threads: list[int] = []

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def runtime(self) -> RuntimeInfo:
        return self._runtime

    def predict(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        self.calls.append(int(features.shape[0]))
        self.threads.append(threading.get_ident())
        if self.predict_gate is not None:
            self.entered.release()
            if not self.predict_gate.wait(timeout=30):
                raise RuntimeError("test predict gate never opened")
        if self.error is not None:
            raise self.error
        return reference_probability(features)

    def warm_up(self) -> None:
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise ArtifactError("test gate never opened")
        if self.warm_up_error is not None:
            raise self.warm_up_error
