"""The physical floor: raw onnxruntime on the service's model file, with the service's session options.

The session is opened the way :meth:`service.predictor.OnnxPredictor.load` opens it (same thread
counts from :class:`service.config.Settings`, sequential execution, all graph optimisations, the
same provider choice), and fed the features the service's own encoder makes from the bench bodies.
Each call is timed on its own, so p50 and p99 are per call; calls/s counts the whole loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.api.columns import request_columns
from service.artifact import ModelMetadata
from service.config import Settings
from service.features import encode_batch
from service.predictor import choose_providers, provider_arguments
from service.schemas import PredictRequest


@dataclass(frozen=True)
class OrtFloor:
    """One batch size through ``session.run`` in a loop on one Python thread."""

    batch: int
    calls: int
    seconds: float
    calls_per_s: float
    users_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class OrtSession:
    session: ort.InferenceSession
    metadata: ModelMetadata
    provider: str
    intra_op_threads: int
    inter_op_threads: int


def open_session(model: Path, settings: Settings) -> OrtSession:
    """An onnxruntime session configured exactly as the service configures its own."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers = choose_providers(settings.providers, ort.get_available_providers())
    session = ort.InferenceSession(
        str(model), sess_options=options, providers=provider_arguments(settings, providers)
    )
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    return OrtSession(
        session=session,
        metadata=metadata,
        provider=session.get_providers()[0],
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )


def features_of(users: Sequence[PredictRequest], metadata: ModelMetadata) -> NDArray[np.float32]:
    """The model input the service builds for ``users``: the same columns and the same encoder."""
    columns = request_columns(users, int(time.time()))
    return encode_batch(
        columns.timestamps,
        columns.amounts,
        columns.quantities,
        columns.offsets,
        columns.as_of,
        metadata.feature_spec,
    )


def measure(ort_session: OrtSession, features: NDArray[np.float32], duration_s: float) -> OrtFloor:
    """Call ``session.run`` on ``features`` back to back for ``duration_s`` (after a short warm-up)."""
    session = ort_session.session
    feeds = {ort_session.metadata.input_name: np.ascontiguousarray(features, dtype=np.float32)}
    outputs = [ort_session.metadata.output_name]
    for _ in range(10):
        session.run(outputs, feeds)
    timings: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(duration_s * 1e9)
    started = clock()
    now = started
    while now < deadline:
        session.run(outputs, feeds)
        end = clock()
        timings.append(end - now)
        now = end
    seconds = (now - started) / 1e9
    per_call_ms = np.asarray(timings, dtype=np.float64) / 1e6
    calls = len(timings)
    batch = int(features.shape[0])
    return OrtFloor(
        batch=batch,
        calls=calls,
        seconds=seconds,
        calls_per_s=calls / seconds,
        users_per_s=calls * batch / seconds,
        p50_ms=float(np.percentile(per_call_ms, 50)),
        p99_ms=float(np.percentile(per_call_ms, 99)),
    )
