"""Many hot swaps under concurrent load against a real process: zero failed requests.

Two models that give different probabilities for the same user stand in for "old" and "new"; each
answer must be a 200 whose probability is the one its own ``model_version`` computes, so an answer
that mixed two models (or named the wrong one) fails. Corrupt files are slipped in between the swaps:
each is refused while the load goes on.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import running_service

pytestmark = pytest.mark.slow

TOKEN = "swap-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = {
    "user_id": "u-1",
    "as_of": "1997-09-30T00:00:00Z",
    "events": [{"timestamp": "1997-09-01T00:00:00Z", "amount": 10.0, "quantity": 2}] * 3,
}
BATCH = {"users": [USER] * 64}  # over the inline size: scored in the worker threads
SWAPS = 100
CORRUPT_EVERY = 10


def _reload_counts(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "purchase_intent_model_reloads":
            return {s.labels["result"]: s.value for s in family.samples if s.name.endswith("_total")}
    raise AssertionError("no reload counter exported")


def test_many_swaps_under_load_fail_no_request(tmp_path: Path) -> None:
    models = {
        "model-a": write_model(tmp_path / "a.onnx", metadata=make_metadata(version="model-a"), bias=-0.5),
        "model-b": write_model(tmp_path / "b.onnx", metadata=make_metadata(version="model-b"), bias=0.7),
    }
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(models["model-b"].read_bytes()[:300])
    env = {"PI_ADMIN_TOKEN": TOKEN}
    with running_service(models["model-a"], tmp_path / "service.log", env=env) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        expected = {}
        for version, path in (("model-b", models["model-b"]), ("model-a", models["model-a"])):
            assert (
                client.post("/admin/reload", json={"model_path": str(path)}, headers=AUTH).status_code == 200
            )
            answer = client.post("/predict", json=USER).json()
            assert answer["model_version"] == version
            expected[version] = answer["probability"]
        assert expected["model-a"] != expected["model-b"]

        stop = threading.Event()
        outcomes: Counter[str] = Counter()
        seen: Counter[str] = Counter()
        problems: list[str] = []
        lock = threading.Lock()

        def load(worker: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    try:
                        r = (
                            c.post("/predict/batch", json=BATCH)
                            if worker % 2
                            else c.post("/predict", json=USER)
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
                        probabilities = [p["probability"] for p in body.get("predictions", [body])]
                        if version not in expected or set(probabilities) != {expected[version]}:
                            problems.append(f"{version}: {sorted(set(probabilities))[:3]}")

        workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        refused = 0
        try:
            for i in range(SWAPS):
                version = "model-b" if i % 2 == 0 else "model-a"
                r = client.post("/admin/reload", json={"model_path": str(models[version])}, headers=AUTH)
                assert r.status_code == 200, r.text
                assert r.json()["model_version"] == version
                if i % CORRUPT_EVERY == 0:
                    r = client.post("/admin/reload", json={"model_path": str(corrupt)}, headers=AUTH)
                    assert r.status_code == 422, r.text
                    refused += 1
                    assert client.get("/v1/model").json()["model_version"] == version  # still serving
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=30)
        metrics = client.get("/metrics").text
        client.close()

    total = sum(outcomes.values())
    failed = total - outcomes["200"]
    print(f"hot swap under load: {SWAPS} swaps, {refused} refused, {total} requests, {failed} failed")
    assert outcomes == Counter({"200": total}), (outcomes, problems[:5])
    assert not problems, problems[:5]
    assert total > SWAPS
    assert set(seen) == {"model-a", "model-b"}, seen
    assert _reload_counts(metrics) == {"success": SWAPS + 2, "failure": refused}
