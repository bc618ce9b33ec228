"""The model behind a protocol: float32 features in, float32 probabilities out, no HTTP.

:class:`OnnxPredictor` is the only implementation the service ships; tests inject fakes that follow
the same :class:`Predictor` protocol through the app factory. Batches are padded up to a few fixed
sizes (powers of two up to the largest batch the server runs, plus that size): onnxruntime's arena
grows with every new input shape and GPU providers tune per shape, so a bounded set keeps memory
flat and lets warm-up cover every shape before the server reports ready, for at most twice the
compute on a padded batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.artifact import ArtifactError, ModelMetadata, TensorSignature, check_signature
from service.config import Settings

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
_DEVICE_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


class ProviderError(RuntimeError):
    """No acceptable execution provider: none of the preferred ones exist, or GPU was required."""


@dataclass(frozen=True)
class RuntimeInfo:
    """What was asked of onnxruntime and what it actually did."""

    requested: tuple[str, ...]  # preference list filtered to providers this build offers
    active: tuple[str, ...]  # session.get_providers(): the first one runs the graph
    batch_sizes: tuple[int, ...]

    @property
    def provider(self) -> str:
        return self.active[0]

    @property
    def fallback(self) -> bool:
        """True when onnxruntime silently dropped the provider we asked for first."""
        return self.active[0] != self.requested[0]


class Predictor(Protocol):
    """What the service needs from a model. Thread-safe: called from the event loop and threads."""

    @property
    def metadata(self) -> ModelMetadata: ...

    @property
    def runtime(self) -> RuntimeInfo: ...

    def predict(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        """``float32 [n, lookback_bins, channels]`` -> ``float32 [n]`` probabilities."""
        ...

    def warm_up(self) -> None:
        """Run every batch shape once and check the answers; raise if the model is unusable."""
        ...


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes: 1, 2, 4, ... below ``max_batch``, then ``max_batch`` itself."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if (1 << k) < max_batch]
    return (*sizes, max_batch)


def provider_arguments(
    settings: Settings, requested: tuple[str, ...]
) -> list[str | tuple[str, dict[str, Any]]]:
    """What ``InferenceSession(providers=...)`` gets: each provider with its options from the
    settings (``device_id`` from ``cuda_device_id`` for the GPU providers unless set explicitly)."""
    out: list[str | tuple[str, dict[str, Any]]] = []
    for name in requested:
        options: dict[str, Any] = dict(settings.provider_options.get(name, {}))
        if name in _DEVICE_PROVIDERS:
            options.setdefault("device_id", settings.cuda_device_id)
        out.append((name, options) if options else name)
    return out


def choose_providers(preferred: tuple[str, ...], available: list[str]) -> tuple[str, ...]:
    """Keep the preferred providers this onnxruntime build offers, in preference order."""
    chosen = tuple(p for p in preferred if p in available)
    if not chosen:
        raise ProviderError(
            f"none of the execution providers {list(preferred)} is available; "
            f"this onnxruntime build offers {available}"
        )
    skipped = list(preferred[: preferred.index(chosen[0])])
    if skipped:
        logger.info(
            "execution providers not offered by this onnxruntime build, skipped",
            extra={"skipped_providers": skipped, "available_providers": available},
        )
    return chosen


class OnnxPredictor:
    """An onnxruntime session plus the metadata it was exported with."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata, runtime: RuntimeInfo) -> None:
        self._session = session
        self._metadata = metadata
        self._runtime = runtime
        self._input = metadata.input_name
        self._outputs = [metadata.output_name]
        self._sizes = np.asarray(runtime.batch_sizes, dtype=np.int64)
        self._max = runtime.batch_sizes[-1]

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def runtime(self) -> RuntimeInfo:
        return self._runtime

    @classmethod
    def load(cls, path: Path, settings: Settings) -> OnnxPredictor:
        """Open, validate and check providers; raises ArtifactError or ProviderError with a clear text.

        Does not warm up: call :meth:`warm_up` before serving.
        """
        if path.is_dir():
            raise ArtifactError(f"model path is a directory, not a file: {path}")
        if not path.is_file():
            raise ArtifactError(f"model file not found: {path}")
        if not os.access(path, os.R_OK):
            raise ArtifactError(f"model file is not readable by this user: {path}")
        requested = choose_providers(settings.providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: we report provider fallback ourselves, as JSON
        provider_args = provider_arguments(settings, requested)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from exc
        metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
        check_signature(
            metadata,
            [TensorSignature(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()],
            [TensorSignature(o.name, o.type, tuple(o.shape)) for o in session.get_outputs()],
        )
        runtime = RuntimeInfo(
            requested=requested,
            active=tuple(session.get_providers()),
            batch_sizes=batch_sizes(min(settings.inference_batch_users, settings.max_batch_users)),
        )
        if runtime.fallback:
            # onnxruntime only prints this to its own log when CUDA libraries fail to load: say it
            # loudly, or a service meant for the GPU runs on the CPU unnoticed.
            logger.warning(
                "onnxruntime fell back from the requested execution provider",
                extra={"requested_providers": list(requested), "active_providers": list(runtime.active)},
            )
        if settings.require_gpu and runtime.provider not in _DEVICE_PROVIDERS:
            raise ProviderError(
                f"a GPU provider is required (PI_REQUIRE_GPU) but the session runs on {runtime.provider}; "
                f"requested {list(requested)}, onnxruntime offers {ort.get_available_providers()}"
            )
        return cls(session, metadata, runtime)

    def _run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        out = self._session.run(self._outputs, {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def predict(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        n = features.shape[0]
        if n == 1:  # a lone request: one is always a warmed size, no search for it
            return self._run(features)
        if n > self._max:
            return np.concatenate([self.predict(features[i : i + self._max]) for i in range(0, n, self._max)])
        size = int(self._sizes[np.searchsorted(self._sizes, n)])
        if size == n:
            return self._run(features)
        padded = np.zeros((size, *features.shape[1:]), dtype=np.float32)
        padded[:n] = features
        return self._run(padded)[:n]

    def warm_up(self) -> None:
        shape = self._metadata.feature_spec.shape
        for size in self._runtime.batch_sizes:
            out = self._run(np.zeros((size, *shape), dtype=np.float32))
            if out.shape != (size,):
                raise ArtifactError(f"warm-up: batch {size} gave output shape {list(out.shape)}")
            if not np.all(np.isfinite(out) & (out >= 0.0) & (out <= 1.0)):
                raise ArtifactError(f"warm-up: batch {size} gave values outside [0, 1]")


def load_predictor(settings: Settings, path: Path | None = None) -> OnnxPredictor:
    """Load, validate and warm up ``path`` or else the configured model (blocking: call it from a
    thread)."""
    path = path if path is not None else settings.model_path
    if path is None:
        raise ArtifactError("no model configured: pass --model PATH or set PI_MODEL_PATH")
    predictor = OnnxPredictor.load(path, settings)
    predictor.warm_up()
    return predictor
