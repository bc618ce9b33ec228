# syntax=docker/dockerfile:1
#
# purchase-intent: train the CDNOW model with CPU PyTorch, then serve it from a slim image that has
# only the service's dependencies (no torch, no pandas) and runs as a non-root user.
#
#   docker build -t purchase-intent .                                  # CPU runtime (default target)
#   docker build --target runtime-gpu -t purchase-intent:gpu .         # CUDA base + the gpu extra
#   docker run --rm -p 127.0.0.1:8000:8000 purchase-intent
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 purchase-intent:gpu
#
# Settings are the PI_* environment variables (README, "Configuration"); the model is baked in at
# /models/cdnow/model.onnx, or mount another file and set PI_MODEL_PATH.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
# PyTorch's CPU-only wheel index: the default index's Linux build drags in several GB of CUDA.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# onnxruntime-gpu is released on its own schedule: pinned here, beside requirements.lock's CPU build.
ARG ORT_GPU_VERSION=1.31.1

# ---- train: CPU PyTorch, exact version; trains, evaluates and exports the CDNOW model ----------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS train
ARG TORCH_INDEX_URL
ARG SEEDS=5
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY service ./service
COPY model_export ./model_export
RUN pip install -r requirements.lock && pip install -c requirements.lock '.[train]'
# the run of record of the rolling backtest: the model's report quotes it (as `make train` does)
COPY docs/backtest/backtest.json ./docs/backtest/backtest.json
RUN python -m model_export train --data cdnow --protocol out-of-time --cutoff latest --seeds "${SEEDS}" \
    --backtest docs/backtest/backtest.json --out /models/cdnow
# the service as a wheel: the runtime installs it with the base dependencies only
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: python slim, service dependencies, the model, a non-root user -------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PI_MODEL_PATH=/models/cdnow/model.onnx PI_HOST=0.0.0.0 PI_PORT=8000 \
    PI_STORE_PATH=/data/events.sqlite3
# /data: the SQLite event store, owned by the service user (mount a volume there to keep it)
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app \
    && mkdir /data && chown 10001:10001 /data
VOLUME /data
COPY requirements.lock /tmp/requirements.lock
COPY --from=train /wheels /wheels
# the pinned dependencies, then the service itself without letting pip resolve anything again
RUN pip install -r /tmp/requirements.lock && pip install --no-deps /wheels/*.whl \
    && rm -rf /wheels /tmp/requirements.lock
COPY --from=train /models/cdnow/model.onnx /models/cdnow/model.onnx
USER 10001:10001
EXPOSE 8000
# Readiness, not liveness: 200 only once the model is loaded and warmed up. Python's stdlib,
# because the slim image has no curl; urlopen raises (exit 1) on a 503 or a refused connection.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PI_PORT', '8000') + '/readyz', timeout=2)"]
# A worker process per CPU the container may use (its CPU quota; PI_WORKERS sets another count).
# Exec form, so SIGTERM reaches the parent directly, which drains every worker.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]

# ---- runtime-gpu: CUDA + cuDNN base, onnxruntime-gpu instead of onnxruntime ---------------------------
FROM ${CUDA_IMAGE} AS runtime-gpu
ARG ORT_GPU_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PI_MODEL_PATH=/models/cdnow/model.onnx PI_HOST=0.0.0.0 PI_PORT=8000 \
    PI_PROVIDERS=cuda,cpu PI_REQUIRE_GPU=true PI_STORE_PATH=/data/events.sqlite3
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app \
    && mkdir /data && chown 10001:10001 /data
VOLUME /data
COPY requirements.lock /tmp/requirements.lock
COPY --from=train /wheels /wheels
# The pinned dependencies and the service; then, since both wheels provide the `onnxruntime`
# module, remove the CPU build and put in only the pinned GPU one, so the CPU wheel cannot shadow it.
RUN pip install -r /tmp/requirements.lock \
    && pip install --no-deps /wheels/*.whl \
    && pip uninstall -y onnxruntime \
    && pip install --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && rm -rf /wheels /tmp/requirements.lock
COPY --from=train /models/cdnow/model.onnx /models/cdnow/model.onnx
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PI_PORT', '8000') + '/readyz', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]

# The last stage is what a plain `docker build` produces: keep the CPU runtime the default.
FROM runtime AS default
