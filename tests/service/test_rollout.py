"""The canary's user split and the shadow's queue, in-process (the end-to-end behaviour is in
test_rollout_e2e.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.api.columns import request_columns
from service.lifecycle import LoadedModel, ModelSlot, Shadow
from service.rollout import canary_bucket, in_canary
from service.schemas import PredictRequest
from service.scoring import encode
from service.shadow import ShadowScorer
from tests.service.fakes import FakePredictor, reference_probability
from tests.waiting import wait_until

USERS = [f"customer-{i}" for i in range(50_000)]


@pytest.mark.parametrize("percent", [0.0, 0.5, 5.0, 30.0, 99.0, 100.0])
def test_canary_share_is_its_percent_of_users(percent: float) -> None:
    share = sum(in_canary(u, percent) for u in USERS) / len(USERS)
    sd = (max(percent / 100 * (1 - percent / 100), 1e-9) / len(USERS)) ** 0.5
    assert abs(share - percent / 100) <= 5 * sd


def test_raising_the_percent_only_adds_users() -> None:
    previous: set[str] = set()
    for percent in (1.0, 2.5, 10.0, 50.0, 100.0):
        chosen = {u for u in USERS[:5000] if in_canary(u, percent)}
        assert previous <= chosen
        previous = chosen
    assert previous == set(USERS[:5000])


def test_buckets_spread_evenly_and_differ_from_python_hash() -> None:
    counts = np.bincount([canary_bucket(u) // 1000 for u in USERS], minlength=10)
    assert counts.min() > 0.9 * len(USERS) / 10
    # a fresh process (another PYTHONHASHSEED) gives the same buckets: test_rollout_e2e restarts one


def _loaded(predictor: FakePredictor) -> LoadedModel:
    return LoadedModel(predictor, 0.0, time.time())


def _columns(n: int) -> tuple[PredictRequest, ...]:
    return tuple(
        PredictRequest.model_validate(
            {
                "user_id": f"u{i}",
                "as_of": "1997-09-30T00:00:00Z",
                "events": [{"timestamp": "1997-09-01T00:00:00Z", "amount": 1.0 + i, "quantity": 1}],
            }
        )
        for i in range(n)
    )


def test_a_full_shadow_queue_drops_and_counts_and_never_blocks() -> None:
    gate = threading.Event()
    primary, candidate = FakePredictor(version="a"), FakePredictor(version="b", predict_gate=gate)
    slot = ModelSlot()
    slot.publish(_loaded(primary))
    slot.install(replace(slot.models, shadow=Shadow(_loaded(candidate), 1.0)))
    registry = CollectorRegistry()
    shadow = ShadowScorer(slot, registry, queue_size=2)
    shadow.start()
    try:
        columns = request_columns(list(_columns(3)), 0)
        served = np.zeros(3, dtype=np.float32)
        shadow.offer(primary, columns, served)
        assert candidate.entered.acquire(timeout=10)  # the shadow thread holds the first call
        started = time.perf_counter()
        for _ in range(5):
            shadow.offer(primary, columns, served)  # two fit the queue, three are dropped
        assert time.perf_counter() - started < 0.5
        assert registry.get_sample_value("purchase_intent_shadow_calls_total", {"result": "dropped"}) == 3
        # calls of another model (a canary, or one swapped out) are not the shadow's to compare
        shadow.offer(FakePredictor(version="c"), columns, served)
        gate.set()
        wait_until(
            lambda: shadow.pending() == 0 or None, timeout=10, message="the shadow queue never drained"
        )
        assert registry.get_sample_value("purchase_intent_shadow_calls_total", {"result": "scored"}) == 3
        assert candidate.calls == [3, 3, 3]
    finally:
        gate.set()
        shadow.stop()
    count = registry.get_sample_value("purchase_intent_shadow_score_difference_count", {"model_version": "b"})
    assert count == 9
    expected = float(np.mean(reference_probability(encode(columns, candidate))))
    mean = registry.get_sample_value("purchase_intent_shadow_mean_score_difference", {"model_version": "b"})
    assert mean == pytest.approx(expected, abs=1e-6)  # minus the zeros "served"


def test_sampling_takes_its_fraction_of_calls() -> None:
    primary, candidate = FakePredictor(version="a"), FakePredictor(version="b")
    slot = ModelSlot()
    slot.publish(_loaded(primary))
    slot.install(replace(slot.models, shadow=Shadow(_loaded(candidate), 0.1)))
    registry = CollectorRegistry()
    draws = iter(np.random.default_rng(3).random(2000).tolist())
    shadow = ShadowScorer(slot, registry, queue_size=5000, draw=lambda: next(draws))
    columns = request_columns(list(_columns(1)), 0)
    for _ in range(2000):
        shadow.offer(primary, columns, np.zeros(1, dtype=np.float32))
    queued = shadow.pending()
    assert 150 < queued < 250  # 10 % of 2,000, within 3.7 standard deviations
