"""The framework floor: FastAPI parsing the service's own request models, answering a constant.

``python -m bench.constant_app --port P`` serves it under uvicorn configured as ``python -m service``
configures it. The body is parsed as the service parses it (``model_validate_json`` on the raw
bytes, one pass), so the gap to the service is everything it does after validation. Not a plain
``body: PredictRequest`` parameter: FastAPI validates a ``json.loads``-ed dict in Python mode,
where the schema's strict mode refuses RFC 3339 strings for datetimes.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response

from service.schemas import BatchPredictRequest, PredictRequest

_PREDICTION = (
    b'{"user_id":"bench-0","probability":0.5,"will_purchase":true,"threshold":0.5,'
    b'"horizon_days":273,"model_version":"constant"}'
)


def create_app() -> FastAPI:
    app = FastAPI(title="constant floor", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        PredictRequest.model_validate_json(await request.body())
        return Response(_PREDICTION, media_type="application/json")

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> Response:
        users = BatchPredictRequest.model_validate_json(await request.body()).users
        predictions = b",".join(b'{"user_id":"u","probability":0.5,"will_purchase":true}' for _ in users)
        return Response(
            b'{"model_version":"constant","threshold":0.5,"horizon_days":273,"predictions":['
            + predictions
            + b"]}",
            media_type="application/json",
        )

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.constant_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    config = uvicorn.Config(
        create_app(),
        host=args.host,
        port=args.port,
        workers=1,
        log_config=None,
        access_log=False,
        server_header=False,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
