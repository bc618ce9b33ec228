"""The service's one settings class: every knob, from the environment (``PI_*``) or the CLI.

Nothing here runs at import time: ``Settings()`` is built by ``python -m service`` (or a test),
never at module level, so importing the package reads no environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.scopes import SCOPES

#: Request latency buckets in seconds: a single request through the whole stack takes well under a
#: millisecond on CPU, so the buckets start far below one (buckets that begin at milliseconds put
#: every request in the first and leave the median unreadable) and reach 10 s for large batch
#: requests on a busy machine.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Short names accepted in ``PI_PROVIDERS`` for the execution providers people actually use.
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

LogLevel = Literal["debug", "info", "warning", "error"]


def _split_csv(value: Any) -> Any:
    """Let list settings be written as ``a,b,c`` in the environment (JSON arrays work too)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Service configuration. Environment variables are the field names upper-cased with ``PI_``."""

    model_config = SettingsConfigDict(
        env_prefix="PI_", extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    model_path: Path | None = None
    """The exported ``model.onnx`` (``--model``). Required unless a predictor is injected (tests)."""

    host: str = "127.0.0.1"
    """Interface to bind (``--host``). Loopback by default; a container sets ``0.0.0.0``."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (``--port``); 0 lets the OS pick one."""

    workers: int | None = Field(default=None, ge=1, le=256)
    """Worker processes sharing the listening socket (``--workers``), each with its own event loop,
    micro-batcher and onnxruntime session. Unset: the CPUs this process may use (the container's
    CPU quota, else its affinity mask). 1 serves from this process alone, as the tests do. With
    more, onnxruntime and batch threads and rate limits are divided between them (docs/operations.md)."""

    providers: Annotated[tuple[str, ...], NoDecode] = (
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    """onnxruntime execution providers in order of preference, comma-separated (``cuda,cpu``).

    Providers this onnxruntime build does not offer are skipped, so the default means "CUDA when
    the ``gpu`` extra is installed, else CPU".
    """

    require_gpu: bool = False
    """Refuse to become ready when the session ends up on CPU (onnxruntime falls back silently)."""

    cuda_device_id: int = Field(default=0, ge=0)
    """GPU ordinal for the CUDA / TensorRT providers."""

    provider_options: dict[str, dict[str, str]] = Field(default_factory=dict)
    """onnxruntime provider options by provider, as JSON: ``{"cuda": {"arena_extend_strategy":
    "kSameAsRequested"}, "tensorrt": {"trt_fp16_enable": "True"}}`` (short names work as keys).
    ``device_id`` comes from ``cuda_device_id`` unless given here."""

    intra_op_threads: int = Field(default=1, ge=0)
    """onnxruntime threads inside one operator; 0 = onnxruntime's default (one per core).

    1 by default: the model is small enough that extra threads cost more to wake than they save on
    one call; the event loop and the request thread pool need the cores.
    """

    inter_op_threads: int = Field(default=1, ge=0)
    """onnxruntime threads across independent operators; 0 = onnxruntime's default."""

    max_batch_users: int = Field(default=1000, ge=1)
    """Most users in one ``/predict/batch`` request; more is a 413."""

    inference_batch_users: int = Field(default=256, ge=1)
    """Most users in one onnxruntime call; a larger batch is scored in slices of this size, which
    are also the largest shape warmed up. 256 suits the CPU: past it the graph's intermediates
    outgrow the caches and the memory arena keeps them at their largest, so slices are faster and
    leaner than one call (docs/model.md, "The served graph"). On a GPU, set it to
    ``max_batch_users``: there one large call is what is fast."""

    max_events_per_user: int = Field(default=10_000, ge=1)
    """Most events for one user; more is a 422 naming that user's ``events`` field."""

    inline_max_body_bytes: int = Field(default=8192, ge=0)
    """Request bodies up to this size are parsed, encoded and scored on the event loop; larger ones
    in the thread pool. A small request costs less than a thread hop under load; a large one
    would stall ``/healthz`` and every other request while it runs."""

    batch_threads: int = Field(default=2, ge=1)
    """Worker threads for large requests; more than the cores only adds contention."""

    microbatch: bool = True
    """Gather concurrent small ``/predict`` requests into one encode + inference call
    (``service/batching.py``). An idle queue never waits, so one connection pays nothing."""

    microbatch_max_users: int = Field(default=64, ge=1)
    """Most users in one gathered micro-batch."""

    microbatch_max_wait_seconds: float = Field(default=0.002, ge=0)
    """Most time a busy micro-batch keeps gathering after its first request, seconds; a cap, not a
    delay: gathering stops as soon as a turn of the event loop brings no new request. 0: take only
    what is already queued."""

    microbatch_queue_size: int = Field(default=128, ge=1)
    """Most requests waiting for a micro-batch; one more is shed with 503 ``overloaded``."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body, bytes; more is a 413, decided from ``Content-Length`` before the body
    is read, or as soon as a streamed (chunked) body passes the limit."""

    max_concurrent_requests: int = Field(default=64, ge=1)
    """Prediction requests being processed at once (body read, queued or computing), per worker
    process; one more is shed at once with 503 ``overloaded`` and ``Retry-After`` instead of
    queueing without bound."""

    request_timeout_seconds: float = Field(default=10.0, gt=0)
    """Seconds a prediction request may take to arrive whole and reach a worker: a body that
    trickles in slower is a 408, a request still waiting for a worker thread a 503. A computation
    that has started is not interrupted (its size is bounded by the body and batch limits)."""

    header_timeout_seconds: float = Field(default=10.0, gt=0)
    """Seconds a connection may take to send a request's line and headers, counted from opening
    or from the previous response: past it, 408 and the connection is closed (a client that
    trickles its headers, or opens connections and sends nothing, cannot hold them forever)."""

    admin_token: SecretStr | None = None
    """Bearer token for the admin and user-data routes while ``PI_TOKENS_FILE`` is unset; with
    neither set, those routes are not mounted (404)."""

    tokens_file: Path | None = None
    """Scoped bearer tokens, one ``name:sha256-hex-of-token:scope,scope`` line each (README,
    "Tokens and scopes"); set, every route but the probes and docs needs a token holding its
    scope. Re-read when it changes. Exclusive with ``PI_ADMIN_TOKEN``."""

    metrics_require_token: bool = False
    """With tokens on, ``/metrics`` and ``/v1/model/performance`` need the ``metrics`` scope too."""

    rate_limits: dict[str, float] = Field(default_factory=dict)
    """Requests a second per client and scope, e.g. ``{"predict": 200, "ingest": 50}`` (JSON); a
    client is a token (by name), or an address while tokens are off. Unlisted scopes are unlimited."""

    rate_limit_burst_seconds: float = Field(default=1.0, gt=0)
    """A client's bucket holds this many seconds of its rate (at least one request)."""

    audit_key: SecretStr | None = None
    """Key of the HMAC that names users in the audit log; without it, a plain sha256 of the id."""

    store_backend: Literal["sqlite", "redis", "none"] = "sqlite"
    """Where ``POST /events`` stores purchase histories for predictions by user id: ``sqlite`` (an
    embedded file, one replica), ``redis`` (shared by replicas) or ``none`` (inline events only)."""

    store_path: Path = Path("data/events.sqlite3")
    """The SQLite file (its directory is created); WAL mode, so ``-wal`` and ``-shm`` files sit
    beside it. Relative paths are from the working directory."""

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """The Redis server for ``PI_STORE_BACKEND=redis`` (may hold a password, so it is kept out of
    reprs and logs)."""

    redis_key_prefix: str = Field(default="pi:", min_length=1)
    """Prefix of every Redis key the service writes (two keys per user)."""

    store_timeout_seconds: float = Field(default=2.0, gt=0)
    """Most time one store call may wait (Redis socket timeout, SQLite lock wait); past it the
    request is a 503 ``store_unavailable``."""

    store_erase_persist_seconds: float = Field(default=60.0, gt=0)
    """Most time ``DELETE /users/{user_id}`` waits, on Redis, for the append-only file rewrite (and
    snapshot, if configured) that drops the erased user from disk; past it the answer is a 503
    ``store_unavailable`` and a retry repeats the rewrite. Grows with the store's size."""

    store_threads: int = Field(default=4, ge=1)
    """Worker threads for event writes and the admin history endpoints (reads for predictions use
    the prediction threads, ``PI_BATCH_THREADS``)."""

    store_retention_days: int = Field(default=400, ge=1)
    """Raw events are kept at least this many days back from now (and never less than the served
    model's lookback); older ones are folded into per-user counters by compaction."""

    store_dedup_seconds: int = Field(default=7 * 86_400, ge=0)
    """An event is kept raw (its id known) for at least this long after it was stored, so a
    retried request within this time is recognised as a duplicate even if compaction ran."""

    store_compact_interval_seconds: float = Field(default=3600.0, ge=0)
    """Seconds between compaction rounds; 0 disables compaction."""

    store_unknown_user: Literal["reject", "empty"] = "reject"
    """A user sent without ``events`` and unknown to the store: ``reject`` answers 404
    ``unknown_user``; ``empty`` scores them as a user with no history (cold start)."""

    outcomes: bool | None = None
    """Record served predictions in the event store and, once their horizon has passed, score them
    against the purchases stored since (live ROC AUC, Brier, log loss, calibration per model
    version). Unset: on whenever there is an event store; it needs one."""

    outcomes_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of users whose predictions are recorded, chosen by a hash of the user id (a user is
    always in or always out, on every replica)."""

    outcomes_window_days: int = Field(default=28, ge=1)
    """The live metrics cover predictions whose horizon ended within this many days, days."""

    outcomes_grace_seconds: int = Field(default=86_400, ge=0)
    """How long after a prediction's horizon the event clock must be before it is settled, seconds:
    room for purchases that reach ``POST /events`` late."""

    outcomes_retention_days: int = Field(default=180, ge=1)
    """A recorded prediction is deleted this many days after it was served, settled or not, days;
    settled ones also once their horizon leaves the window. Keep it above the model's horizon plus
    the window, or predictions are deleted before they count."""

    outcomes_interval_seconds: float = Field(default=60.0, gt=0)
    """Seconds between rounds of the outcome job (settle what is due, prune, score the window)."""

    outcomes_flush_seconds: float = Field(default=1.0, gt=0)
    """Seconds between writes of the recorded predictions buffered in memory."""

    outcomes_buffer_users: int = Field(default=100_000, ge=1)
    """Most predictions buffered in memory between writes; more are dropped and counted."""

    outcomes_auc_margin: float = Field(default=0.05, ge=0.0, le=1.0)
    """How far live ROC AUC may fall below the model's offline AUC before the alert in
    deploy/rules.yml fires (exported as a gauge for the rule to read)."""

    drift: bool = True
    """Compare served scores with the model file's reference distribution (PSI and KS per model
    version); a model without a reference reports none."""

    drift_window_scores: int = Field(default=10_000, ge=10)
    """Most recent scores per model version that PSI and KS are computed over."""

    drift_min_scores: int = Field(default=1_000, ge=1)
    """PSI and KS are reported once a version's window holds at least this many scores."""

    drift_interval_seconds: float = Field(default=1.0, gt=0)
    """Seconds between drift updates (new scores into the windows and the decile histogram, PSI
    and KS recomputed). Scores wait in memory until then, so keep it short."""

    drift_psi_threshold: float = Field(default=0.2, gt=0)
    """PSI above which the drift alert in deploy/rules.yml fires (exported as a gauge)."""

    monitor_max_versions: int = Field(default=3, ge=1)
    """Model versions with live-quality and drift series at once: those most recently served by
    this process (a bound on the ``model_version`` label)."""

    shadow_model: Path | None = None
    """A second model file scored beside the served one on a sample of requests, after the answer
    is sent and never changing it (its score difference, drift and live quality are exported).
    Also set by ``PUT /admin/models/shadow``."""

    shadow_sample: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of scoring calls the shadow model also scores (a micro-batch is sampled whole)."""

    shadow_queue_size: int = Field(default=256, ge=1)
    """Scoring calls waiting for the shadow model; one more is dropped and counted, so a slow
    shadow costs answers nothing but coverage."""

    canary_model: Path | None = None
    """A second model file that answers ``PI_CANARY_PERCENT`` of users on ``/predict``, chosen by a
    hash of the user id (a user stays on one model across requests, replicas and restarts). Also
    set by ``PUT /admin/models/canary``."""

    canary_percent: float = Field(default=5.0, ge=0.0, le=100.0)
    """Percent of users the canary model answers, percent."""

    exit_on_load_failure: bool = True
    """Exit non-zero when the model cannot be loaded at start-up; false keeps the process up and not
    ready (a later ``/admin/reload`` can still load one)."""

    shutdown_drain_seconds: int = Field(default=2, ge=0)
    """On SIGTERM, how long to keep serving with ``/readyz`` already 503, so load balancers stop
    routing here before the listening socket closes. Part of the grace period, not added to it."""

    shutdown_grace_seconds: int = Field(default=10, ge=1)
    """On SIGTERM, the most time until the process exits: the drain, then in-flight requests finish
    (those still running after it are cancelled)."""

    log_level: LogLevel = "info"
    """Level of the JSON logs on stderr."""

    latency_buckets: Annotated[tuple[float, ...], NoDecode] = DEFAULT_LATENCY_BUCKETS
    """Request and inference latency histogram buckets, seconds, comma-separated."""

    @model_validator(mode="after")
    def _check_shutdown(self) -> Settings:
        if self.shutdown_drain_seconds >= self.shutdown_grace_seconds:
            raise ValueError("shutdown_drain_seconds must be shorter than shutdown_grace_seconds")
        return self

    @model_validator(mode="after")
    def _check_tokens(self) -> Settings:
        if self.tokens_file is not None and self.admin_token is not None:
            raise ValueError(
                "PI_ADMIN_TOKEN and PI_TOKENS_FILE are exclusive: give a token the admin scope in the file"
            )
        unknown = sorted(set(self.rate_limits) - set(SCOPES))
        if unknown:
            raise ValueError(f"rate_limits: unknown scope(s) {unknown}; known: {', '.join(SCOPES)}")
        if any(rate <= 0 for rate in self.rate_limits.values()):
            raise ValueError("rate_limits: every rate must be > 0 requests a second")
        return self

    @model_validator(mode="after")
    def _check_outcomes(self) -> Settings:
        if self.outcomes and self.store_backend == "none":
            raise ValueError("outcomes need an event store: PI_STORE_BACKEND is none")
        return self

    @property
    def records_outcomes(self) -> bool:
        """Whether served predictions are recorded for their outcomes (the default follows the store)."""
        return self.store_backend != "none" if self.outcomes is None else self.outcomes

    @field_validator("providers", mode="before")
    @classmethod
    def _parse_providers(cls, value: Any) -> Any:
        value = _split_csv(value)
        if isinstance(value, list | tuple):
            return tuple(PROVIDER_ALIASES.get(str(v).lower(), str(v)) for v in value)
        return value

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one execution provider is needed")
        return value

    @field_validator("provider_options")
    @classmethod
    def _name_providers(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        return {PROVIDER_ALIASES.get(k.lower(), k): v for k, v in value.items()}

    @field_validator("latency_buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("latency_buckets")
    @classmethod
    def _check_buckets(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(b <= 0 for b in value) or list(value) != sorted(set(value)):
            raise ValueError("latency buckets must be positive and strictly increasing")
        return value
