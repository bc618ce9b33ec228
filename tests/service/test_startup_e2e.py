"""Start-up failures of a real process: each broken model exits 1 with one clear error line, or,
if configured, the process stays alive and not ready (and an admin reload can still fix it).

All the broken starts run at once: each is a process start, which is the slow part.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.artifact import ModelMetadata
from tests import waiting
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import start_service, wait_until

pytestmark = pytest.mark.slow


def _future_format() -> ModelMetadata:
    return dataclasses.replace(make_metadata(), format_version=99)


#: name -> (how to make the file, what the one error line must say)
BROKEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda d: d / "missing.onnx", "model file not found"),
    "a directory": (lambda d: d, "is a directory"),
    "empty file": (lambda d: _bytes(d / "m.onnx", b""), "cannot load"),
    "not onnx": (lambda d: _bytes(d / "m.onnx", b"not a model"), "cannot load"),
    "truncated onnx": (lambda d: _truncated(d / "m.onnx"), "cannot load"),
    "no metadata": (lambda d: write_model(d / "m.onnx", props={}), "not a purchase-intent model"),
    "future format": (
        lambda d: write_model(d / "m.onnx", metadata=_future_format()),
        "format_version 99 is not supported",
    ),
    "fixed batch": (lambda d: write_model(d / "m.onnx", batch=4), "fixed batch size"),
    "wrong input name": (lambda d: write_model(d / "m.onnx", input_name="x"), "expected exactly one named"),
    "wrong feature shape": (lambda d: write_model(d / "m.onnx", shape=(9, 3)), "feature spec gives"),
}


def _bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _truncated(path: Path) -> Path:
    write_model(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_each_broken_model_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    started = []
    for i, (name, (make, _)) in enumerate(BROKEN.items()):
        workdir = tmp_path / f"case{i}"
        workdir.mkdir()
        proc = start_service(make(workdir), tmp_path / f"case{i}.log")
        started.append((name, proc))
    for name, proc in started:
        try:
            code = proc.process.wait(timeout=60)
        finally:
            proc.stop()
        expected = BROKEN[name][1]
        assert code == 1, name
        errors = [x for x in proc.log_lines() if x["level"] in ("error", "critical")]
        assert len(errors) == 1, (name, errors)
        assert errors[0]["message"].startswith("cannot serve: "), (name, errors)
        assert expected in errors[0]["message"], (name, errors)
        assert "\n" not in errors[0]["message"], name
        assert "exc_info" not in errors[0], name  # a clear line, not a traceback


def test_stays_alive_not_ready_then_an_admin_reload_makes_it_ready(tmp_path: Path) -> None:
    broken = write_model(tmp_path / "broken.onnx", batch=4)
    good = write_model(tmp_path / "good.onnx")
    env = {"PI_EXIT_ON_LOAD_FAILURE": "false", "PI_ADMIN_TOKEN": "t0ken"}
    proc = start_service(broken, tmp_path / "service.log", env=env)
    try:
        wait_until(f"{proc.url}/healthz", proc.process)
        wait_until(f"{proc.url}/readyz", proc.process, status=503)

        def settled() -> httpx.Response | None:
            r = httpx.get(f"{proc.url}/readyz")
            return None if r.json()["status"] == "loading" else r

        r = waiting.wait_until(settled, timeout=30, interval=0.05, message="readiness still says loading")
        assert r.json()["status"] == "failed"
        assert str(tmp_path) not in r.text
        assert httpx.post(f"{proc.url}/predict", json={"user_id": "u", "events": []}).status_code == 503
        reload = httpx.post(
            f"{proc.url}/admin/reload",
            json={"model_path": str(good)},
            headers={"Authorization": "Bearer t0ken"},
            timeout=30,
        )
        assert reload.status_code == 200, reload.text
        assert reload.json()["previous_version"] is None
        assert httpx.get(f"{proc.url}/readyz").status_code == 200
        assert httpx.post(f"{proc.url}/predict", json={"user_id": "u", "events": []}).status_code == 200
    finally:
        assert proc.stop() in (0, -signal.SIGTERM)
