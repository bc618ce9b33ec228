# Set-up is two commands on a fresh machine: `make serve` and `make test` (see README.md).
# Every target creates and fills .venv itself; stamps make reruns cheap.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL_DIR ?= models/cdnow
MODEL  := $(MODEL_DIR)/model.onnx
HOST   ?= 127.0.0.1
PORT   ?= 8000
SEEDS  ?= 5
SOAK_SECONDS ?= 180

.PHONY: env gpu-env system-deps train train-customer-split backtest serve score bench bench-score bench-peers test test-fast soak lint format clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned exactly: the train extra names torch==2.13.0 too, but installing it up
# front keeps pip from resolving it against the registry's CUDA builds. Then the service's pinned
# runtime dependencies (requirements.lock), which also constrain everything the extras bring.
$(VENV)/.stamp-train: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet -c requirements.lock -e '.[train]'
	touch $@

# The scoring job's Ray engine (--engine ray), for make bench-score and the tests.
$(VENV)/.stamp-ray: $(VENV)/.stamp-train
	$(BIN)/pip install --quiet -c requirements.lock -e '.[train,ray]'
	touch $@

# The ray extra too: `make test` runs the scoring job's Ray engine on a local Ray.
$(VENV)/.stamp-dev: $(VENV)/.stamp-ray
	$(BIN)/pip install --quiet -c requirements.lock -e '.[train,dev,ray]'
	touch $@

# The Kubernetes manifest checkers tests/service/test_k8s.py runs: checkov in a venv of its own (it
# pins packaging and other libraries below what requirements.lock holds), and prometheus-operator's
# CRD schema from the npm registry, pinned by its package-lock.json (npm comes from system-deps).
CHECKOV_VENV := .venv-checkov
CRD_CHECK := deploy/k8s/crd-check
$(CHECKOV_VENV)/.stamp:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet 'checkov==3.3.30'
	touch $@

$(CRD_CHECK)/node_modules/.stamp: $(CRD_CHECK)/package-lock.json | system-deps
	npm ci --prefix $(CRD_CHECK) --no-audit --no-fund --silent
	touch $@

MANIFEST_TOOLS := $(CHECKOV_VENV)/.stamp $(CRD_CHECK)/node_modules/.stamp

# Re-resolve the runtime dependencies in a scratch venv (no torch, no extras) and pin them.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet '.[arrow]'
	{ sed -n '1,3p' requirements.lock; .lock-venv/bin/pip freeze --exclude purchase-intent --all \
	  | grep -vE '^(pip|setuptools|wheel)=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

env: $(VENV)/.stamp-dev

# onnxruntime-gpu and onnxruntime both provide the `onnxruntime` module: remove both, then put back
# only the GPU build, so the CPU wheel cannot shadow it.
# The version matches the Dockerfile's ORT_GPU_VERSION.
ORT_GPU_VERSION ?= 1.31.1
gpu-env: $(VENV)/.stamp-dev
	$(BIN)/pip uninstall --quiet -y onnxruntime onnxruntime-gpu
	$(BIN)/pip install --quiet --no-deps 'onnxruntime-gpu==$(ORT_GPU_VERSION)'

# On a machine with an NVIDIA GPU: every node on CUDA (onnxruntime's profile), answers within 1e-5
# of the CPU's (onnxruntime and the service), then `make bench` on the GPU, its table appended to
# bench/README.md ("GPU runs"). E.g. make gpu-check GPU_CHECK_ARGS="--bench-args '--duration 5s'".
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: gpu-env system-deps $(MODEL)
	$(BIN)/python -m bench.gpu_check --model $(MODEL) $(GPU_CHECK_ARGS)

# The served model is the production one: the out-of-time protocol at the latest cutoff the 13-week
# horizon allows (fitted on features at 1997-12-30 with labels up to 1998-03-31, judged on the last 13
# weeks of CDNOW). Its report quotes the rolling backtest as the estimate of how it will do: the last
# `make backtest` run if there is one, else the run of record committed in docs/backtest/.
BACKTEST ?= $(firstword $(wildcard models/backtest/backtest.json) docs/backtest/backtest.json)
TRAIN_ARGS := --data cdnow --protocol out-of-time --cutoff latest --seeds $(SEEDS) --backtest $(BACKTEST)

$(MODEL): | $(VENV)/.stamp-train
	$(BIN)/python -m model_export train $(TRAIN_ARGS) --out $(MODEL_DIR)

# Retrains unconditionally; `make serve` trains only when the model file is missing.
train: $(VENV)/.stamp-train
	$(BIN)/python -m model_export train $(TRAIN_ARGS) --out $(MODEL_DIR)

# The calibration/holdout split of the literature: features at 1997-09-30, customers split three ways.
train-customer-split: $(VENV)/.stamp-train
	$(BIN)/python -m model_export train --data cdnow --protocol customer-split --seeds $(SEEDS) --out models/cdnow-cs

# The out-of-time protocol at every monthly cutoff the horizon allows (docs/model.md, "Backtest").
# A quick look: make backtest BACKTEST_ARGS='--cutoffs 3 --seeds 1'.
BACKTEST_SEEDS ?= $(SEEDS)
BACKTEST_ARGS ?=
backtest: $(VENV)/.stamp-train
	$(BIN)/python -m model_export backtest --data cdnow --seeds $(BACKTEST_SEEDS) --out models/backtest $(BACKTEST_ARGS)

serve: $(MODEL)
	$(BIN)/python -m service --model $(MODEL) --host $(HOST) --port $(PORT)

# Every CDNOW customer scored by the served model, at the end of the log's last day unless
# SCORE_ARGS says otherwise (README.md, "Batch scoring"), e.g. make score SCORE_ARGS='--as-of 1998-03-31'.
SCORE_OUT ?= $(MODEL_DIR)/scores.parquet
SCORE_ARGS ?=
score: $(MODEL)
	$(BIN)/python -m model_export score --model $(MODEL) --data cdnow --out $(SCORE_OUT) $(SCORE_ARGS)

system-deps:
	scripts/system-deps.sh

# The serving benchmark (bench/README.md): the service against raw onnxruntime and a constant-answer
# FastAPI app, in one run. BENCH_MODEL picks another model file; BENCH_ARGS passes flags through,
# e.g. make bench BENCH_ARGS='--duration 30s --json /tmp/run.json'.
BENCH_MODEL ?= $(MODEL)
BENCH_ARGS ?=

# Trains the default model if it is missing (as `make serve` does); an overridden path must exist.
bench: $(VENV)/.stamp-train system-deps $(filter $(MODEL),$(BENCH_MODEL))
	$(BIN)/python -m bench --model $(BENCH_MODEL) $(BENCH_ARGS)

# The scoring job, local engine and Ray engine, on CDNOW made 1, 10 and 40 times larger (built in a
# temporary folder) against raw onnxruntime, with each run's memory (bench/README.md, "Scoring job").
# Needs no wrk: the job is a process of its own. E.g. make bench-score BENCH_SCORE_ARGS='--scales
# 1,10 --workdir /tmp/logs' or BENCH_SCORE_ARGS='--engines local'.
BENCH_SCORE_ARGS ?=
bench-score: $(VENV)/.stamp-ray $(filter $(MODEL),$(BENCH_MODEL))
	$(BIN)/python -m bench.score --model $(BENCH_MODEL) $(BENCH_SCORE_ARGS)

# Training on CDNOW made 1 and 40 times larger (built in a temporary folder): peak RSS and wall of
# `train --seeds 1 --epochs 2` at each, judged at 40x (bench/README.md, "Training at scale", which
# says where the wall target's reference, --today-wall-s, comes from).
# E.g. make bench-train-scale BENCH_TRAIN_SCALE_ARGS='--scales 1,10 --workdir /tmp/logs'.
.PHONY: bench-train-scale
BENCH_TRAIN_SCALE_ARGS ?= --today-wall-s 480
bench-train-scale: $(VENV)/.stamp-train
	$(BIN)/python -m bench.train_scale $(BENCH_TRAIN_SCALE_ARGS)

# Scoped tokens on against off at 64 connections, and a rate limit's accuracy under wrk load
# (bench/README.md, "Tokens and rate limits"). E.g. make bench-auth BENCH_AUTH_ARGS='--rate 200'.
BENCH_AUTH_ARGS ?=
.PHONY: bench-auth
bench-auth: $(VENV)/.stamp-dev system-deps $(filter $(MODEL),$(BENCH_MODEL))
	$(BIN)/python -m bench.auth --model $(BENCH_MODEL) $(BENCH_AUTH_ARGS)

# /predict from one and two worker processes beside the constant floor, in alternating rounds
# (bench/README.md, "Worker processes"). E.g. make bench-workers BENCH_WORKERS_ARGS='--rounds 3'.
BENCH_WORKERS_ARGS ?=
.PHONY: bench-workers
bench-workers: $(VENV)/.stamp-dev system-deps $(filter $(MODEL),$(BENCH_MODEL))
	$(BIN)/python -m bench.workers --model $(BENCH_MODEL) $(BENCH_WORKERS_ARGS)

# Everything, end-to-end tests included: what CI runs.
test: $(VENV)/.stamp-dev system-deps $(MANIFEST_TOOLS)
	$(BIN)/python -m pytest

# The quick loop while editing: no real server, Redis, Prometheus or CLI training (the `slow` marker).
test-fast: $(VENV)/.stamp-dev system-deps $(MANIFEST_TOOLS)
	$(BIN)/python -m pytest -m "not slow"

# Minutes of mixed traffic + hot swaps against a real server; prints requests, errors, RSS growth.
# Not part of `make test`.
soak: $(VENV)/.stamp-dev
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS)

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/bandit -c pyproject.toml -r service model_export bench -q

format: $(VENV)/.stamp-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(CRD_CHECK)/node_modules .mypy_cache .ruff_cache .pytest_cache

# BentoML serving the same model and body next to the service (bench/README.md, "Peers"), in its own
# venv: BentoML's dependencies never enter .venv. onnxruntime and numpy pinned as in requirements.lock;
# our package without its dependencies, for the shared encoder the BentoML service imports.
PEERS_VENV := bench/.venv-peers
PEERS_ARGS ?=
$(PEERS_VENV)/.stamp: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet 'bentoml==1.4.40' \
	  $$(grep -E '^(onnxruntime|numpy|pydantic)==' requirements.lock)
	$(PEERS_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# The other peers, each in its own venv (bench/.venv-<peer>), pinned to the versions bench/README.md
# names; onnxruntime as in requirements.lock, numpy too except where a peer needs numpy < 2, and our
# package without its dependencies for the shared encoder. MLServer takes uvloop unpinned: pinned here.
PEERS_PINS_mlserver := mlserver==1.7.1 uvloop==0.21.0
PEERS_PINS_kserve   := kserve==0.21.0
PEERS_PINS_pytriton := nvidia-pytriton==0.7.0
PEERS_PINS_litserve := litserve==0.2.19
PEERS_NUMPY_pytriton := 'numpy<2'
bench/.venv-%/.stamp: pyproject.toml requirements.lock
	rm -rf bench/.venv-$*
	$(PYTHON) -m venv bench/.venv-$*
	bench/.venv-$*/bin/pip install --quiet --upgrade pip
	bench/.venv-$*/bin/pip install --quiet $(PEERS_PINS_$*) \
	  $$(grep -E '^onnxruntime==' requirements.lock) \
	  $(or $(PEERS_NUMPY_$*),$$(grep -E '^numpy==' requirements.lock))
	bench/.venv-$*/bin/pip install --quiet --no-deps -e .
	touch $@

PEERS_OTHERS := mlserver kserve pytriton litserve
# A peer whose install fails does not stop the run: the run records it as not installed (no .stamp).
bench-peers: $(VENV)/.stamp-train system-deps $(filter $(MODEL),$(BENCH_MODEL))
	@for p in peers $(PEERS_OTHERS); do \
	  $(MAKE) --no-print-directory bench/.venv-$$p/.stamp \
	    || echo "bench-peers: installing bench/.venv-$$p failed (above); going on without it" >&2; \
	done
	$(BIN)/python -m bench.peers --model $(BENCH_MODEL) $(PEERS_ARGS)
