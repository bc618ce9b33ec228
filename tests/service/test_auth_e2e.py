"""Tokens with a real ``python -m service`` process on the real tiny model: a token rotated in the
file without a restart, the audit lines in the process's own JSON log, a bad tokens file refused
at start naming its line, and ``hash-token``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TinyModel
from tests.service.processes import running_service, start_service
from tests.service.test_store_e2e import AS_OF, cdnow_users, inline

pytestmark = pytest.mark.slow


def line(name: str, token: str, scopes: str) -> str:
    return f"{name}:{hashlib.sha256(token.encode()).hexdigest()}:{scopes}\n"


def test_a_rotated_token_works_without_a_restart_and_calls_are_audited(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        line("shop", "old-secret", "predict,predict:stored") + line("ops", "ops-secret", "users:delete")
    )
    user, history = next(iter(cdnow_users(tiny_model_dir, 1).items()))
    body = {"user_id": user, "as_of": AS_OF, "events": inline(history)}
    env = {"PI_TOKENS_FILE": str(tokens)}
    with (
        running_service(tiny_model_dir.model, tmp_path / "service.log", env=env) as service,
        httpx.Client(base_url=service.url, timeout=30) as client,
    ):
        assert client.get("/readyz").status_code == 200  # probes stay open
        assert client.post("/predict", json=body).status_code == 401
        old = {"Authorization": "Bearer old-secret"}
        new = {"Authorization": "Bearer new-secret"}
        first = client.post("/predict", json=body, headers=old)
        assert first.status_code == 200
        assert client.post("/predict", json=body, headers=new).status_code == 401
        # rotation: the new token added beside the old, clients moved, the old removed
        tokens.write_text(tokens.read_text() + line("shop-2", "new-secret", "predict"))
        deadline = time.monotonic() + 10
        while client.post("/predict", json=body, headers=new).status_code != 200:
            assert time.monotonic() < deadline, "the new token was never accepted"
            time.sleep(0.1)
        assert client.post("/predict", json=body, headers=new).json() == first.json()
        tokens.write_text(line("shop-2", "new-secret", "predict") + line("ops", "ops-secret", "users:delete"))
        while client.post("/predict", json=body, headers=old).status_code != 401:
            assert time.monotonic() < deadline, "the old token was never dropped"
            time.sleep(0.1)
        erased = client.delete(f"/users/{user}", headers={"Authorization": "Bearer ops-secret"})
        assert erased.status_code == 200
        assert client.delete(f"/users/{user}", headers=new).status_code == 403
    logs = service.log_lines()  # once stopped: a line is written after its answer is sent
    audit = [x for x in logs if x.get("logger") == "service.audit" or x.get("message") == "audit"]
    assert [(x["token"], x["scope"], x["status"]) for x in audit] == [
        ("ops", "users:delete", 200),
        ("shop-2", "users:delete", 403),
    ]
    assert all(x["user"] == hashlib.sha256(user.encode()).hexdigest()[:32] for x in audit)
    text = (tmp_path / "service.log").read_text()
    assert "ops-secret" not in text
    assert "new-secret" not in text
    assert f'"{user}"' not in text.split("audit", 1)[1]  # the id itself never follows an audit line
    assert "tokens file reloaded" in text


def test_a_bad_tokens_file_stops_the_start_naming_the_line(tiny_model_dir: TinyModel, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# ok\nshop:abc:predict\n")
    server = start_service(tiny_model_dir.model, tmp_path / "bad.log", env={"PI_TOKENS_FILE": str(tokens)})
    assert server.process.wait(timeout=60) == 2
    assert "line 2: the hash must be 64 hex digits" in (tmp_path / "bad.log").read_text()


def test_hash_token_prints_the_files_hash() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service", "hash-token"],
        input="s3cret\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == hashlib.sha256(b"s3cret").hexdigest()
