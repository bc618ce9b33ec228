"""The same model and body served by MLServer 1.7: a custom runtime with two ways in.

``POST /predict`` is a custom handler taking our body as it is (the tuned way: no V2 decoding);
``POST /v2/models/purchase-intent/infer`` is MLServer's V2 path, one BYTES input ``body`` holding
our body's JSON per row, where the model settings may turn on adaptive batching. Both call
:class:`bench.peers.model.PeerModel`. Runs only in ``bench/.venv-mlserver``; ``python -m bench.peers``
writes the settings files and starts ``mlserver start``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import ORJSONResponse, Response
from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from bench.peers.model import PeerModel


class PurchaseIntent(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        self._model = PeerModel(self.settings.parameters.uri)
        return True

    @custom_handler(rest_path="/predict")
    async def predict_raw(self, request: Request) -> Response:
        answer: dict[str, Any] = self._model.predict_json(await request.body())
        return ORJSONResponse(answer)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        bodies = [json.loads(text) for text in StringCodec.decode_input(payload.inputs[0])]
        answers = self._model.predict_many(bodies)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                ResponseOutput(
                    name="probability",
                    shape=[len(answers), 1],
                    datatype="FP64",
                    data=[a["probability"] for a in answers],
                )
            ],
        )
