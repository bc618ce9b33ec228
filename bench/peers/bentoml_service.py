"""The same model and body served by BentoML 1.4: the peer ``make bench-peers`` measures us against.

Written the way BentoML's documentation writes a service (a ``@bentoml.service`` class, one sync
``@bentoml.api`` whose input is the whole ``/predict`` body as a pydantic root input), with what
must match ours matched: the same ONNX file, onnxruntime configured as ours, our shared encoder
(bench/README.md, "Peers"). Runs only in ``bench/.venv-peers``:

    PI_PEER_MODEL=models/cdnow/model.onnx bentoml serve bench.peers.bentoml_service:PurchaseIntent
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime

import bentoml
import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field

from service.artifact import ModelMetadata
from service.features import encode_batch

#: The model file, from the environment (BentoML builds the class itself, with no arguments).
MODEL_ENV = "PI_PEER_MODEL"


class Event(BaseModel):
    timestamp: datetime
    amount: float = Field(ge=0)
    quantity: int = Field(ge=0)


class PredictInput(BaseModel):
    """Our ``/predict`` body: a user, its purchases and the moment to predict from."""

    user_id: str = Field(min_length=1, max_length=256)
    events: list[Event] = Field(default_factory=list)
    as_of: datetime | None = None


class PredictOutput(BaseModel):
    user_id: str
    probability: float
    will_purchase: bool
    threshold: float
    horizon_days: int
    model_version: str


# The worker count comes from the environment too: the bench runs this file at 1 and 2 workers.
@bentoml.service(workers=int(os.environ.get("PI_PEER_WORKERS", "1")), traffic={"timeout": 30})
class PurchaseIntent:
    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            os.environ[MODEL_ENV], sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.meta = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)

    @bentoml.api
    def predict(self, body: PredictInput, /) -> PredictOutput:
        now = time.time() if body.as_of is None else body.as_of.timestamp()
        features = encode_batch(
            np.array([math.floor(e.timestamp.timestamp()) for e in body.events], dtype=np.int64),
            np.array([e.amount for e in body.events], dtype=np.float64),
            np.array([e.quantity for e in body.events], dtype=np.float64),
            np.array([0, len(body.events)], dtype=np.int64),
            np.array([math.floor(now)], dtype=np.int64),
            self.meta.feature_spec,
        )
        out = self.session.run([self.meta.output_name], {self.meta.input_name: features})[0]
        probability = float(out[0])
        return PredictOutput(
            user_id=body.user_id,
            probability=probability,
            will_purchase=probability >= self.meta.threshold,
            threshold=self.meta.threshold,
            horizon_days=self.meta.horizon_days,
            model_version=self.meta.model_version,
        )
