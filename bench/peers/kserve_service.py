"""The same model and body served by KServe 0.21's python ``ModelServer``: a custom ``kserve.Model``.

Written as KServe's custom-predictor guide writes one: ``load`` builds the session, a sync
``predict`` receives the V1 body (our ``/predict`` body as it is) at
``POST /v1/models/purchase-intent:predict``. KServe reads its own flags (``--http_port``,
``--workers``, ``--enable_grpc``) from the command line; the model file comes from
``PI_PEER_MODEL``. Runs only in ``bench/.venv-kserve``:

    PI_PEER_MODEL=models/cdnow/model.onnx python -m bench.peers.kserve_service --http_port 8080
"""

from __future__ import annotations

from typing import Any

import kserve

from bench.peers.model import PeerModel

NAME = "purchase-intent"


class PurchaseIntent(kserve.Model):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(NAME)
        self.load()

    def load(self) -> bool:
        self._model = PeerModel()
        self.ready = True
        return True

    # With --workers > 1 KServe pickles the model into each worker process; an onnxruntime session
    # does not pickle, so each worker opens its own.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_model"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        return self._model.predict(payload)


if __name__ == "__main__":
    kserve.ModelServer().start([PurchaseIntent()])
