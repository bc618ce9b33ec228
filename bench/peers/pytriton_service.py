"""The same model and body served by PyTriton 0.7 (Triton 2.51 inside) with dynamic batching.

Triton speaks only its V2 protocol, so our body travels whole as one BYTES element of the input
``body`` (``POST /v2/models/purchase_intent/infer``) and the answer is the ``probability`` output;
the parse, encoder and session are those of :class:`bench.peers.model.PeerModel`, called once per
batch Triton forms. Runs only in ``bench/.venv-pytriton`` (numpy < 2), with the interpreter's
libpython on ``LD_LIBRARY_PATH`` for Triton's python-backend stub (``python -m bench.peers`` sets it).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from numpy.typing import NDArray
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers.model import PeerModel

NAME = "purchase_intent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=100)
    args = parser.parse_args()
    model = PeerModel()

    @batch
    def infer(body: NDArray[np.object_]) -> dict[str, NDArray[np.float64]]:
        answers = model.predict_many([json.loads(row[0]) for row in body])  # body: (batch, 1) bytes
        return {"probability": np.array([[a["probability"]] for a in answers], dtype=np.float64)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=NAME,
            infer_func=infer,
            inputs=[Tensor(name="body", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="probability", dtype=np.float64, shape=(1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
