"""Merging the worker processes' metrics, and what each worker's settings become (in-process; the
processes themselves are in test_workers_e2e.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from service.cluster import MergedCollector, families_from_json, families_to_json, merge
from service.config import Settings
from service.metrics import GAUGE_MODES, PREFIX, Metrics
from service.workers import per_worker, usable_cpus


def _worker(requests: int, in_flight: float, ready: float, latencies: list[float]) -> list[Metric]:
    registry = CollectorRegistry()
    c = Counter(f"{PREFIX}_requests", "r", ["route"], registry=registry)
    c.labels("/predict").inc(requests)
    Gauge(f"{PREFIX}_requests_in_flight", "f", registry=registry).set(in_flight)
    Gauge(f"{PREFIX}_ready", "r", registry=registry).set(ready)
    h = Histogram(f"{PREFIX}_request_duration_seconds", "d", buckets=(0.001, 0.01), registry=registry)
    for value in latencies:
        h.observe(value)
    return families_from_json(families_to_json(registry.collect()))  # as it travels between workers


def _values(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in families for s in m.samples}


def test_counters_and_histograms_add_up_and_gauges_follow_their_mode() -> None:
    merged = _values(merge([_worker(3, 1, 1, [0.0005, 0.02]), _worker(5, 2, 0, [0.005])], GAUGE_MODES))
    assert merged[(f"{PREFIX}_requests_total", (("route", "/predict"),))] == 8
    assert merged[(f"{PREFIX}_requests_in_flight", ())] == 3  # sum
    assert merged[(f"{PREFIX}_ready", ())] == 0  # min: not ready until every worker is
    bucket = f"{PREFIX}_request_duration_seconds_bucket"
    assert merged[(bucket, (("le", "0.001"),))] == 1
    assert merged[(bucket, (("le", "0.01"),))] == 2
    assert merged[(bucket, (("le", "+Inf"),))] == 3
    assert merged[(f"{PREFIX}_request_duration_seconds_count", ())] == 3
    assert merged[(f"{PREFIX}_request_duration_seconds_sum", ())] == pytest.approx(0.0255)


def test_created_takes_the_earliest_and_leader_gauges_come_from_worker_0() -> None:
    def worker(created: float, clock: float) -> list[Metric]:
        counter = Metric(f"{PREFIX}_users_scored", "u", "counter")
        counter.add_sample(f"{PREFIX}_users_scored_total", {}, 1.0)
        counter.add_sample(f"{PREFIX}_users_scored_created", {}, created)
        gauge = Metric(f"{PREFIX}_outcome_clock_timestamp_seconds", "c", "gauge")
        gauge.add_sample(f"{PREFIX}_outcome_clock_timestamp_seconds", {}, clock)
        return [counter, gauge]

    merged = _values(merge([worker(20.0, 7.0), worker(10.0, 9.0)], GAUGE_MODES))
    assert merged[(f"{PREFIX}_users_scored_created", ())] == 10.0
    assert merged[(f"{PREFIX}_outcome_clock_timestamp_seconds", ())] == 7.0


def test_a_gauge_without_a_declared_mode_is_refused() -> None:
    registry = CollectorRegistry()
    Gauge("purchase_intent_something_new", "n", registry=registry).set(1)
    with pytest.raises(KeyError, match="declares no mode"):
        merge([list(registry.collect())], GAUGE_MODES)


def test_every_gauge_the_service_registers_declares_a_mode() -> None:
    metrics = Metrics(CollectorRegistry(), latency_buckets=(0.1,), reject_reasons=("x",))
    gauges = [m.name for m in metrics.registry.collect() if m.type == "gauge"]
    assert gauges
    assert not [g for g in gauges if g not in GAUGE_MODES]


def test_the_merged_exposition_is_valid_text_with_non_finite_values() -> None:
    registry = CollectorRegistry()
    Gauge(f"{PREFIX}_score_psi", "p", registry=registry).set(math.inf)
    Gauge(f"{PREFIX}_score_ks", "k", registry=registry).set(math.nan)
    families = merge([families_from_json(families_to_json(registry.collect()))], GAUGE_MODES)
    out = CollectorRegistry()
    out.register(MergedCollector(families))
    parsed = {
        s.name: s.value
        for f in text_string_to_metric_families(generate_latest(out).decode())
        for s in f.samples
    }
    assert parsed[f"{PREFIX}_score_psi"] == math.inf
    assert math.isnan(parsed[f"{PREFIX}_score_ks"])


def test_threads_and_rate_limits_are_divided_between_the_workers(tmp_path: Path) -> None:
    cpus = usable_cpus()
    settings = Settings(
        model_path=tmp_path / "m.onnx", intra_op_threads=0, batch_threads=64, rate_limits={"predict": 500.0}
    )
    changed = per_worker(settings, 2)
    share = max(1, cpus // 2)
    assert changed["intra_op_threads"] == share
    assert changed["batch_threads"] == share
    assert changed["rate_limits"] == {"predict": 250.0}
    assert per_worker(Settings(model_path=tmp_path / "m.onnx"), 1) == (
        {"batch_threads": 1} if cpus < 2 else {}
    )
