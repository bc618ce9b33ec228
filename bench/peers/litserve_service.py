"""The same model and body served by LitServe 0.2: a ``LitAPI`` at ``POST /predict``.

``decode_request`` keeps our parsed body, ``predict`` runs :class:`bench.peers.model.PeerModel`;
with ``--max-batch-size`` above 1 LitServe collects requests for up to ``--batch-timeout`` seconds
and ``predict`` gets the list (one encoder call, one session run). ``--workers`` is LitServe's
``workers_per_device`` on the CPU. Runs only in ``bench/.venv-litserve``:

    PI_PEER_MODEL=models/cdnow/model.onnx python -m bench.peers.litserve_service --port 8000
"""

from __future__ import annotations

import argparse
from typing import Any

import litserve as ls

from bench.peers.model import PeerModel

Body = dict[str, Any]


class PurchaseIntent(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        self._model = PeerModel()

    # Unannotated on purpose: LitServe reads these two annotations at run time, and none means "the
    # request's JSON body, parsed" and "the dict as JSON", with no pydantic model in between.
    def decode_request(self, request, **kwargs: Any) -> Body:  # type: ignore[no-untyped-def]
        return request  # type: ignore[no-any-return]

    def batch(self, inputs: list[Body]) -> list[Body]:
        return inputs

    def predict(self, x: Body | list[Body], **kwargs: Any) -> Body | list[Body]:
        return self._model.predict_many(x) if isinstance(x, list) else self._model.predict(x)

    def unbatch(self, output: list[Body]) -> list[Body]:
        return output

    def encode_response(self, output: Body, **kwargs: Any):  # type: ignore[no-untyped-def]
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout", type=float, default=0.001)
    args = parser.parse_args()
    batching = args.max_batch_size > 1
    api = PurchaseIntent(
        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout if batching else 0.0
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
