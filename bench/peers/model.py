"""Our ``/predict`` as a plain object the peers wrap: the same ONNX file, encoder and onnxruntime settings.

Runs inside each peer's venv (numpy, onnxruntime and our package without its dependencies), so it
imports nothing from the service's HTTP side. ``predict_many`` encodes every body into one batch,
for the peers that batch; ``predict`` is the same call for one body.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import onnxruntime as ort

from service.artifact import ModelMetadata
from service.features import encode_batch

#: The model file, from the environment (the peers build their handlers themselves).
MODEL_ENV = "PI_PEER_MODEL"


def _epoch(text: str) -> int:
    return math.floor(datetime.fromisoformat(text).timestamp())


class PeerModel:
    """One onnxruntime session configured as the service's (1 intra-op, 1 inter-op, sequential)."""

    def __init__(self, path: str | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            path or os.environ[MODEL_ENV], sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.meta = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)

    def predict_many(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``/predict`` answer for each parsed body, from one encoder call and one session run."""
        timestamps: list[int] = []
        amounts: list[float] = []
        quantities: list[float] = []
        offsets = [0]
        as_of = []
        for body in bodies:
            for event in body.get("events", []):
                timestamps.append(_epoch(event["timestamp"]))
                amounts.append(float(event["amount"]))
                quantities.append(float(event["quantity"]))
            offsets.append(len(timestamps))
            when = body.get("as_of")
            as_of.append(math.floor(time.time()) if when is None else _epoch(when))
        features = encode_batch(
            np.array(timestamps, dtype=np.int64),
            np.array(amounts, dtype=np.float64),
            np.array(quantities, dtype=np.float64),
            np.array(offsets, dtype=np.int64),
            np.array(as_of, dtype=np.int64),
            self.meta.feature_spec,
        )
        out = self.session.run([self.meta.output_name], {self.meta.input_name: features})[0]
        return [self._answer(body["user_id"], float(p)) for body, p in zip(bodies, out, strict=True)]

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.predict_many([body])[0]

    def predict_json(self, raw: bytes | str) -> dict[str, Any]:
        return self.predict(json.loads(raw))

    def _answer(self, user_id: str, probability: float) -> dict[str, Any]:
        return {
            "user_id": user_id,
            "probability": probability,
            "will_purchase": probability >= self.meta.threshold,
            "threshold": self.meta.threshold,
            "horizon_days": self.meta.horizon_days,
            "model_version": self.meta.model_version,
        }
