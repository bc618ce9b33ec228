"""``python -m bench``: the serving benchmark, the service measured against its floors.

One run starts the real service under uvicorn on loopback, loads it with wrk, and in the same run
measures the floors it is compared with: raw onnxruntime on the same model file with the same
session options, and a FastAPI app that parses the same request model and answers a constant.
See ``bench/README.md``.
"""
