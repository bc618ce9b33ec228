"""Settings from the environment and the CLI; nothing happens at import time."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.__main__ import _parse_args
from service.config import DEFAULT_LATENCY_BUCKETS, Settings


def test_defaults() -> None:
    s = Settings()
    assert s.model_path is None
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert s.latency_buckets == DEFAULT_LATENCY_BUCKETS
    assert s.latency_buckets[0] <= 0.0001  # sub-millisecond resolution for a ~25 us model
    assert s.admin_token is None  # no admin endpoint unless a token is set
    assert s.shutdown_drain_seconds < s.shutdown_grace_seconds
    assert s.max_body_bytes < 10_000_000  # the hostile-input catalogue's 10 MB body is a 413


def test_the_admin_token_is_kept_out_of_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI_ADMIN_TOKEN", "hunter2-token")
    s = Settings()
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "hunter2-token"
    assert "hunter2" not in repr(s)


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI_MODEL_PATH", "/models/m.onnx")
    monkeypatch.setenv("PI_PORT", "9001")
    monkeypatch.setenv("PI_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("PI_REQUIRE_GPU", "true")
    monkeypatch.setenv("PI_LATENCY_BUCKETS", "0.0001,0.001,0.1")
    monkeypatch.setenv("PI_MAX_BATCH_USERS", "50")
    s = Settings()
    assert str(s.model_path) == "/models/m.onnx"
    assert s.port == 9001
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert s.require_gpu is True
    assert s.latency_buckets == (0.0001, 0.001, 0.1)
    assert s.max_batch_users == 50


def test_json_lists_work_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI_PROVIDERS", '["CPUExecutionProvider"]')
    assert Settings().providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PI_PORT", "70000"),
        ("PI_PROVIDERS", ""),
        ("PI_LATENCY_BUCKETS", "0.1,0.01"),
        ("PI_MAX_BATCH_USERS", "0"),
        ("PI_LOG_LEVEL", "loud"),
        ("PI_SHUTDOWN_DRAIN_SECONDS", "10"),  # not shorter than the default grace of 10 s
        ("PI_MAX_BODY_BYTES", "100"),
        ("PI_REQUEST_TIMEOUT_SECONDS", "0"),
        ("PI_MAX_CONCURRENT_REQUESTS", "0"),
    ],
)
def test_invalid_environment_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_cli_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI_PORT", "9001")
    monkeypatch.setenv("PI_HOST", "0.0.0.0")
    overrides = _parse_args(["--model", "m.onnx", "--port", "8123"])
    s = Settings(**overrides)
    assert (str(s.model_path), s.port, s.host) == ("m.onnx", 8123, "0.0.0.0")


def test_importing_the_service_reads_nothing_and_pulls_in_no_training_stack() -> None:
    """No Settings() or app at import, and never torch, pandas or onnx in the serving process."""
    code = (
        "import sys, os; os.environ['PI_PORT'] = 'not a port'\n"
        "import service, service.app, service.__main__, service.api.predict\n"
        "bad = sorted(m for m in ('torch', 'pandas', 'onnx') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_core_imports_no_web_framework() -> None:
    """STYLE.md: the HTTP-free core (encoding, scoring, batching, model lifecycle, bulk parsing,
    the store, the typed errors) can be used without FastAPI or Starlette."""
    core = (
        "service.features, service.scoring, service.batching, service.lifecycle, service.bulk, "
        "service.predictor, service.errors, service.store, service.store.guard, service.store.upkeep, "
        "service.columns, service.history, service.gather, service.v2"
    )
    code = (
        f"import sys\nimport {core}\n"
        "bad = sorted(m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_middleware_and_the_envelope_import_no_router() -> None:
    """Dependencies point one way: the ASGI middleware and the error envelope sit below the routers,
    so they import neither FastAPI nor anything under ``service.api``."""
    code = (
        "import sys\nimport service.limits, service.middleware, service.envelope\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('fastapi', 'service.api')))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_bad_settings_exit_2_with_a_clear_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "error: setting port (PI_PORT)" in proc.stderr


def test_event_store_defaults_and_the_redis_url_stays_out_of_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PI_STORE_PATH")  # the suite points every store at a temp dir
    s = Settings()
    assert s.store_backend == "sqlite"
    assert str(s.store_path) == "data/events.sqlite3"
    assert s.store_unknown_user == "reject"
    assert s.store_retention_days * 86_400 > s.store_dedup_seconds
    monkeypatch.setenv("PI_STORE_BACKEND", "redis")
    monkeypatch.setenv("PI_REDIS_URL", "redis://:s3cret-pass@cache:6379/1")
    s = Settings()
    assert s.redis_url.get_secret_value().endswith("@cache:6379/1")
    assert "s3cret" not in repr(s)
    monkeypatch.setenv("PI_STORE_BACKEND", "postgres")
    with pytest.raises(ValidationError):
        Settings()


def test_provider_options_reach_the_session_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.predictor import provider_arguments

    monkeypatch.setenv("PI_PROVIDER_OPTIONS", '{"cuda": {"arena_extend_strategy": "kSameAsRequested"}}')
    monkeypatch.setenv("PI_CUDA_DEVICE_ID", "1")
    s = Settings()
    assert s.provider_options == {"CUDAExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}}
    assert provider_arguments(
        s, ("CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider")
    ) == [
        ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested", "device_id": 1}),
        ("TensorrtExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
