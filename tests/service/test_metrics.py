"""The metrics module on its own: the array histogram matches client_python's, labels stay closed."""

from __future__ import annotations

import subprocess

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from starlette.testclient import TestClient

from service.metrics import PROBABILITY_BUCKETS, ArrayHistogram
from tests.service.processes import require_binary


def test_array_histogram_matches_client_python_histogram() -> None:
    values = np.concatenate([np.random.default_rng(0).random(500), [0.0, 0.05, 0.5, 1.0, 0.999999]])
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = ArrayHistogram("p", "doc", PROBABILITY_BUCKETS)
    ours_registry.register(ours)
    ours.observe_many(values[:200])
    ours.observe_many(values[200:])
    theirs = Histogram("p", "doc", buckets=PROBABILITY_BUCKETS, registry=theirs_registry)
    for v in values:
        theirs.observe(float(v))
    for le in [*(repr(b) for b in PROBABILITY_BUCKETS), "+Inf"]:
        labels = {"le": le}
        assert ours_registry.get_sample_value("p_bucket", labels) == theirs_registry.get_sample_value(
            "p_bucket", labels
        ), le
    assert ours_registry.get_sample_value("p_count") == len(values)
    got_sum = ours_registry.get_sample_value("p_sum")
    assert got_sum is not None
    assert abs(got_sum - float(values.sum())) < 1e-9


def test_array_histogram_counts_one_value_as_observe_many_does() -> None:
    """A lone request's probability goes through ``observe``: the same buckets, count and sum as
    ``observe_many``, bounds included (``le`` is "<=")."""
    values = [*PROBABILITY_BUCKETS, 0.0, 1.0, 0.3333, *np.random.default_rng(1).random(300).tolist()]
    one_registry, many_registry = CollectorRegistry(), CollectorRegistry()
    one, many = (
        ArrayHistogram("p", "doc", PROBABILITY_BUCKETS),
        ArrayHistogram("p", "doc", PROBABILITY_BUCKETS),
    )
    one_registry.register(one)
    many_registry.register(many)
    for v in values:  # one call per value on both: a sum of many in one call is added pairwise
        one.observe(float(np.float32(v)))
        many.observe_many(np.asarray([v], dtype=np.float32))
    assert generate_latest(one_registry) == generate_latest(many_registry)


def test_metrics_output_passes_promtool(client: TestClient) -> None:
    promtool = require_binary("promtool")
    client.post("/predict", json={"user_id": "u", "events": []})
    client.get("/nope")
    text = client.get("/metrics").text
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "", check.stdout  # no lint warnings either
    assert check.stderr.strip() == "", check.stderr


def test_each_registry_is_independent(client: TestClient, registry: CollectorRegistry) -> None:
    """Tests build many apps in one process: nothing lands on the global registry."""
    from prometheus_client import REGISTRY

    client.post("/predict", json={"user_id": "u", "events": []})
    assert registry.get_sample_value("purchase_intent_users_scored_total") == 1
    assert b"purchase_intent_" not in generate_latest(REGISTRY)
