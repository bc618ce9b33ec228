"""Shadow and canary models against a real ``python -m service`` process and real ONNX files.

Two models that give different probabilities for the same events stand in for the served model
and the candidate, so every answer can be checked against the version it names. The shadow must
leave every answer byte for byte as it was; the canary must answer exactly the users whose id
hashes into its share, on every request and after a restart; a promotion under load must fail no
request; bad admin requests must be refused with the serving models untouched.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.drift import ScoreReference
from service.rollout import in_canary
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

TOKEN = "rollout-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {
    "PI_ADMIN_TOKEN": TOKEN,
    "PI_DRIFT_INTERVAL_SECONDS": "0.2",
    "PI_DRIFT_MIN_SCORES": "10",
    "PI_OUTCOMES_FLUSH_SECONDS": "0.2",
}
EVENTS = [
    {"timestamp": "1997-09-01T00:00:00Z", "amount": 10.0, "quantity": 2},
    {"timestamp": "1997-08-11T00:00:00Z", "amount": 25.5, "quantity": 1},
]
REFERENCE = ScoreReference.of([k / 1000 for k in range(200, 800)])


def _user(user_id: str, n_events: int = 2) -> dict[str, Any]:
    return {"user_id": user_id, "as_of": "1997-09-30T00:00:00Z", "events": (EVENTS * 4)[:n_events]}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        "model-a": write_model(
            tmp_path / "a.onnx",
            metadata=make_metadata(version="model-a", score_reference=REFERENCE),
            bias=-0.5,
        ),
        "model-b": write_model(
            tmp_path / "b.onnx",
            metadata=make_metadata(version="model-b", score_reference=REFERENCE),
            bias=0.7,
        ),
    }


@pytest.fixture
def server(models: dict[str, Path], tmp_path: Path) -> Iterator[ServiceProcess]:
    with running_service(models["model-a"], tmp_path / "service.log", env=ENV) as process:
        yield process


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _value(client: httpx.Client, name: str, **labels: str) -> float:
    return _samples(client.get("/metrics").text, name).get(tuple(sorted(labels.items())), 0.0)


def _wait_for(client: httpx.Client, name: str, at_least: float, **labels: str) -> None:
    wait_until(
        lambda: _value(client, name, **labels) >= at_least or None,
        timeout=10,
        message=lambda: f"{name}{labels} stayed at {_value(client, name, **labels)}, below {at_least}",
    )


def _loaded(client: httpx.Client) -> list[tuple[str, str]]:
    return [(m["role"], m["model_version"]) for m in client.get("/v1/model").json()["loaded"]]


def _put(client: httpx.Client, role: str, **body: object) -> httpx.Response:
    return client.put(f"/admin/models/{role}", json=body, headers=AUTH)


def test_shadow_leaves_answers_unchanged_and_reports_its_difference(
    server: ServiceProcess, models: dict[str, Path]
) -> None:
    client = httpx.Client(base_url=server.url, timeout=30)
    singles = [_user(f"s-{i}", 1 + i % 5) for i in range(40)]
    batch = {"users": [_user(f"b-{i}", 1 + i % 7) for i in range(30)]}

    def answers() -> list[bytes]:
        return [client.post("/predict", json=u).content for u in singles]

    before = answers()
    before_batch = client.post("/predict/batch", json=batch).content
    # what model-b answers these users: served to all of them as a canary, then rolled back
    assert _put(client, "canary", model_path=str(models["model-b"]), percent=100).status_code == 200
    served_b = [client.post("/predict", json=u).json() for u in singles]
    assert {a["model_version"] for a in served_b} == {"model-b"}
    assert client.delete("/admin/models/canary", headers=AUTH).json()["unloaded_version"] == "model-b"

    r = _put(client, "shadow", model_path=str(models["model-b"]), sample=1.0)
    assert r.status_code == 200, r.text
    assert (r.json()["role"], r.json()["model_version"], r.json()["previous_version"]) == (
        "shadow",
        "model-b",
        None,
    )
    assert _loaded(client) == [("primary", "model-a"), ("shadow", "model-b")]
    assert client.get("/v1/model").json()["loaded"][1]["sample"] == 1.0

    assert answers() == before  # byte for byte: the shadow never touches an answer
    scored = "purchase_intent_shadow_calls_total"
    _wait_for(client, scored, len(singles), result="scored")
    difference = "purchase_intent_shadow_score_difference"
    assert _value(client, f"{difference}_count", model_version="model-b") == len(singles)
    differences = [b["probability"] - json_probability(a) for a, b in zip(before, served_b, strict=True)]
    assert min(differences) > 0.05  # model-b's bias is higher: the checks below compare something
    total = _value(client, f"{difference}_sum", model_version="model-b")
    assert total == pytest.approx(sum(abs(d) for d in differences), abs=1e-9)
    mean = _value(client, "purchase_intent_shadow_mean_score_difference", model_version="model-b")
    assert mean == pytest.approx(sum(differences) / len(differences), abs=1e-9)

    assert client.post("/predict/batch", json=batch).content == before_batch
    users = len(singles) + len(batch["users"])
    _wait_for(client, f"{difference}_count", users, model_version="model-b")
    assert _value(client, scored, result="dropped") == _value(client, scored, result="failed") == 0

    # its own drift and live-quality series, under its version
    window = "purchase_intent_score_window_size"
    _wait_for(client, window, users, model_version="model-b")
    performance = client.get("/v1/model/performance").json()
    assert "model-b" in [m["model_version"] for m in performance["models"]], performance
    assert _value(client, "purchase_intent_loaded_model_info", role="shadow", model_version="model-b") == 1

    assert client.delete("/admin/models/shadow", headers=AUTH).json() == {
        "role": "shadow",
        "unloaded_version": "model-b",
    }
    assert _loaded(client) == [("primary", "model-a")]
    metrics = client.get("/metrics").text
    assert not _samples(metrics, f"{difference}_count"), "an unloaded shadow keeps no difference series"
    assert not _samples(metrics, "purchase_intent_loaded_model_info").get(
        (("model_version", "model-b"), ("role", "shadow"))
    )
    assert answers() == before
    client.close()


def json_probability(answer: bytes) -> float:
    return float(httpx.Response(200, content=answer).json()["probability"])


def _versions(client: httpx.Client, users: list[str]) -> dict[str, str]:
    return {u: client.post("/predict", json=_user(u)).json()["model_version"] for u in users}


def _probabilities(client: httpx.Client, candidate: Path) -> dict[str, float]:
    """What each model answers for the events every canary test sends (only the id varies)."""
    out = {}
    for version in ("model-a", "model-b"):
        percent = 0 if version == "model-a" else 100
        assert _put(client, "canary", model_path=str(candidate), percent=percent).status_code == 200
        answer = client.post("/predict", json=_user("probe")).json()
        assert answer["model_version"] == version
        out[version] = answer["probability"]
    assert out["model-a"] != out["model-b"]
    return out


def test_canary_answers_its_share_of_users_sticky_by_user_id(models: dict[str, Path], tmp_path: Path) -> None:
    percent = 30.0
    env = {**ENV, "PI_CANARY_MODEL": str(models["model-b"]), "PI_CANARY_PERCENT": str(percent)}
    users = [f"user-{i:05d}" for i in range(1500)]
    with running_service(models["model-a"], tmp_path / "first.log", env=env) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        # loaded from the settings once the served model was
        wait_until(
            lambda: ("canary", "model-b") in _loaded(client) or None, timeout=10, message="no canary loaded"
        )
        assert client.get("/v1/model").json()["loaded"][1]["percent"] == percent
        first = _versions(client, users)
        again = _versions(client, users[:300])
        canary_users = _value(client, "purchase_intent_canary_users_scored_total")
        # monitored under the version that answered: the canary's scores in its own drift window
        on_canary = sum(v == "model-b" for v in [*first.values(), *again.values()])
        _wait_for(client, "purchase_intent_score_window_size", on_canary, model_version="model-b")
        assert _value(client, "purchase_intent_score_window_size", model_version="model-b") == on_canary
        performance = client.get("/v1/model/performance").json()
        assert {"model-a", "model-b"} <= {m["model_version"] for m in performance["models"]}
        expected = _probabilities(client, models["model-b"])
        client.close()

    share = sum(v == "model-b" for v in first.values()) / len(users)
    assert abs(share - percent / 100) < 0.05, share  # 4 standard deviations at 1,500 users
    # the documented rule exactly: blake2b of the user id, on the scale of 10,000
    assert first == {u: "model-b" if in_canary(u, percent) else "model-a" for u in users}
    assert again == {u: first[u] for u in users[:300]}  # sticky across requests
    assert canary_users == sum(v == "model-b" for v in first.values()) + sum(
        v == "model-b" for v in again.values()
    )

    # another process (another hash salt) over the admin API: the same users on the canary
    with running_service(models["model-a"], tmp_path / "second.log", env=ENV) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        assert _loaded(client) == [("primary", "model-a")]
        r = _put(client, "canary", model_path=str(models["model-b"]), percent=percent)
        assert r.status_code == 200, r.text
        assert r.json()["role"] == "canary"
        answers = [client.post("/predict", json=_user(u)).json() for u in users[:500]]
        assert {a["user_id"]: a["model_version"] for a in answers} == {u: first[u] for u in users[:500]}
        # each answer is the one its named version computes
        assert all(a["probability"] == expected[a["model_version"]] for a in answers)
        # raising the share only adds users
        assert _put(client, "canary", percent=60).json()["previous_version"] == "model-b"
        wider = _versions(client, users[:500])
        assert all(wider[u] == "model-b" for u in users[:500] if first[u] == "model-b")
        assert sum(v == "model-b" for v in wider.values()) > sum(first[u] == "model-b" for u in users[:500])
        # rollback: everyone back on the served model
        assert client.delete("/admin/models/canary", headers=AUTH).json() == {
            "role": "canary",
            "unloaded_version": "model-b",
        }
        assert set(_versions(client, users[:200]).values()) == {"model-a"}
        assert _loaded(client) == [("primary", "model-a")]
        # batch requests are answered by the served model, as their one model_version says
        assert _put(client, "canary", model_path=str(models["model-b"]), percent=100).status_code == 200
        batch = client.post("/predict/batch", json={"users": [_user(u) for u in users[:20]]}).json()
        assert batch["model_version"] == "model-a"
        assert {p["probability"] for p in batch["predictions"]} == {expected["model-a"]}
        # a large body is scored in a worker thread: the access log still names the canary
        large = {**_user("user-large"), "events": EVENTS * 80}  # past PI_INLINE_MAX_BODY_BYTES
        assert len(json.dumps(large)) > 8192
        answered = client.post("/predict", json=large)
        assert answered.status_code == 200, answered.text
        assert answered.json()["model_version"] == "model-b"
        client.close()
    logged = [x for x in server.log_lines() if x.get("path") == "/predict"]
    assert logged[-1]["model_version"] == "model-b"


def test_promote_under_load_fails_no_request(server: ServiceProcess, models: dict[str, Path]) -> None:
    client = httpx.Client(base_url=server.url, timeout=30)
    expected = _probabilities(client, models["model-b"])
    assert client.delete("/admin/models/canary", headers=AUTH).status_code == 200
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    problems: list[str] = []
    lock = threading.Lock()

    def load(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                user = _user(f"w{worker}-{i}")
                try:
                    r = (
                        c.post("/predict/batch", json={"users": [user] * 40})
                        if worker == 3
                        else c.post("/predict", json=user)
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        outcomes[type(exc).__name__] += 1
                    continue
                with lock:
                    outcomes[str(r.status_code)] += 1
                    if r.status_code != 200:
                        problems.append(r.text[:200])
                        continue
                    body = r.json()
                    version = body["model_version"]
                    seen[version] += 1
                    probabilities = {p["probability"] for p in body.get("predictions", [body])}
                    if probabilities != {expected.get(version)}:
                        problems.append(f"{version}: {sorted(probabilities)[:3]}")

    workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    cycles = 10
    try:
        for k in range(cycles):
            candidate = "model-b" if k % 2 == 0 else "model-a"
            r = _put(client, "canary", model_path=str(models[candidate]), percent=50)
            assert r.status_code == 200, r.text
            time.sleep(0.1)
            r = client.post("/admin/models/canary/promote", headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == candidate
            assert _loaded(client) == [("primary", candidate)]
            assert client.post("/predict", json=_user(f"after-{k}")).json()["model_version"] == candidate
            time.sleep(0.1)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    r = client.post("/admin/models/canary/promote", headers=AUTH)
    assert (r.status_code, r.json()["error"]) == (409, "no_canary")
    client.close()
    total = sum(outcomes.values())
    assert outcomes == Counter({"200": total}), (outcomes, problems[:5])
    assert not problems, problems[:5]
    assert total > 4 * cycles
    assert set(seen) == {"model-a", "model-b"}, seen


def test_bad_admin_requests_leave_the_serving_models_untouched(
    server: ServiceProcess, models: dict[str, Path], tmp_path: Path
) -> None:
    client = httpx.Client(base_url=server.url, timeout=30)
    user = _user("u-1")
    answer = client.post("/predict", json=user).content
    assert _put(client, "shadow", model_path=str(models["model-b"]), sample=0.5).status_code == 200
    loaded = client.get("/v1/model").json()["loaded"]

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(models["model-b"].read_bytes()[:300])
    meta = make_metadata(version="model-c", score_reference=REFERENCE)
    bins, channels = meta.feature_spec.shape
    wrong_spec = write_model(tmp_path / "spec.onnx", metadata=meta, shape=(bins + 1, channels))
    horizon = write_model(
        tmp_path / "horizon.onnx", metadata=dataclasses.replace(meta, horizon_weeks=meta.horizon_weeks + 4)
    )
    same_version = write_model(tmp_path / "again.onnx", metadata=make_metadata(version="model-a"))
    cases: list[tuple[str, str, dict[str, object], int, str, str | None]] = []
    for role, share in (("shadow", "sample"), ("canary", "percent")):
        cases += [
            (
                role,
                "missing file",
                {"model_path": str(tmp_path / "absent.onnx")},
                422,
                "model_rejected",
                None,
            ),
            (role, "corrupt file", {"model_path": str(corrupt)}, 422, "model_rejected", None),
            (role, "wrong feature spec", {"model_path": str(wrong_spec)}, 422, "model_rejected", None),
            (role, "another horizon", {"model_path": str(horizon)}, 422, "model_rejected", None),
            (role, "the served version", {"model_path": str(same_version)}, 422, "model_rejected", None),
            (
                role,
                "share too high",
                {"model_path": str(models["model-b"]), share: 101},
                422,
                "invalid_input",
                share,
            ),
            (
                role,
                "share negative",
                {"model_path": str(models["model-b"]), share: -0.1},
                422,
                "invalid_input",
                share,
            ),
            (
                role,
                "share a string",
                {"model_path": str(models["model-b"]), share: "5"},
                422,
                "invalid_input",
                share,
            ),
            (
                role,
                "unknown field",
                {"model_path": str(models["model-b"]), "pct": 5},
                422,
                "invalid_input",
                "pct",
            ),
            (role, "empty path", {"model_path": ""}, 422, "invalid_input", "model_path"),
            (role, "no path configured", {}, 422, "model_rejected", None),
        ]
    for role, what, body, status, code, field in cases:
        r = client.put(f"/admin/models/{role}", json=body, headers=AUTH)
        assert (r.status_code, r.json()["error"]) == (status, code), (role, what, r.text)
        if field is not None:
            assert field in {d["field"] for d in r.json()["detail"]}, (role, what, r.text)
        assert client.get("/v1/model").json()["loaded"] == loaded, (role, what)
        assert client.post("/predict", json=user).content == answer, (role, what)
    r = client.put(
        "/admin/models/canary", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_json")
    r = client.put("/admin/models/canary", json={"model_path": str(models["model-b"])})
    assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
    r = client.delete("/admin/models/primary", headers=AUTH)
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = client.post("/admin/models/canary/promote", headers=AUTH)
    assert (r.status_code, r.json()["error"]) == (409, "no_canary")
    r = client.post("/admin/models/shadow", headers=AUTH)  # two routes share the path: both named
    assert (r.status_code, r.headers["allow"]) == (405, "DELETE, PUT")
    # a hot reload to the shadow's own version: the shadow would be compared with itself
    r = client.post("/admin/reload", json={"model_path": str(models["model-b"])}, headers=AUTH)
    assert (r.status_code, r.json()["error"]) == (422, "model_rejected"), r.text
    assert "loaded as the shadow" in r.json()["message"]
    assert client.get("/v1/model").json()["loaded"] == loaded
    assert client.post("/predict", json=user).content == answer
    assert "Traceback" not in server.log.read_text()
    client.close()


def test_configured_models_that_fail_to_load_are_left_out(models: dict[str, Path], tmp_path: Path) -> None:
    meta = make_metadata(version="model-c")
    bins, channels = meta.feature_spec.shape
    wrong_spec = write_model(tmp_path / "spec.onnx", metadata=meta, shape=(bins, channels + 1))
    env = {**ENV, "PI_SHADOW_MODEL": str(tmp_path / "absent.onnx"), "PI_CANARY_MODEL": str(wrong_spec)}
    with running_service(models["model-a"], tmp_path / "service.log", env=env) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        wait_until(
            lambda: (
                sum("not loaded, serving without" in line.get("message", "") for line in server.log_lines())
                == 2
                or None
            ),
            timeout=10,
            message="no error line for each configured model",
        )
        assert _loaded(client) == [("primary", "model-a")]
        assert client.get("/readyz").status_code == 200
        assert client.post("/predict", json=_user("u-1")).json()["model_version"] == "model-a"
        client.close()
