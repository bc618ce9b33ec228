"""The numpy measures behind live accuracy and drift, on their own: equal to the references a user
would check them against (sklearn, an exact two-sample KS), whatever order the users come in, and
the model file's score reference surviving the trip through ONNX metadata."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from model_export import metrics as offline
from service import quality
from service.artifact import ArtifactError, ModelMetadata
from service.columns import Folded
from service.drift import GRID_STEPS, ScoreReference, ScoreWindow, bin_counts, ks, psi
from service.outcomes import Recorder, outcome_of
from service.predictor import load_predictor
from service.store import COMPACTED, UNOBSERVED, History, Prediction
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model

DAY = 86_400


def _data(seed: int, n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.round(rng.beta(2, 6, n), 3)  # rounded: many ties
    y = (rng.random(n) < p).astype(np.int64)
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_live_measures_equal_sklearn_and_ignore_the_order_of_users(seed: int) -> None:
    y, p = _data(seed)
    q = quality.quality(y, p)
    assert q.roc_auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert q.brier == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert q.log_loss == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), abs=1e-12)
    assert (q.count, q.positives, q.base_rate) == (y.size, int(y.sum()), y.mean())
    order = np.random.default_rng(seed + 10).permutation(y.size)
    shuffled = quality.quality(y[order], p[order])
    assert shuffled.roc_auc == q.roc_auc  # exact: tie-group counts, not float sums
    assert shuffled.calibration == q.calibration  # ties split by (score, label), not arrival
    assert shuffled.brier == pytest.approx(q.brier, abs=1e-15)


def test_calibration_deciles_cover_every_user_in_order() -> None:
    y, p = _data(4, 1005)
    groups = quality.calibration_deciles(y, p)
    assert [g.decile for g in groups] == list(range(1, 11))
    assert sum(g.count for g in groups) == 1005
    assert all(a.upper <= b.lower for a, b in itertools.pairwise(groups))
    assert sum(g.observed_rate * g.count for g in groups) == pytest.approx(y.sum())
    assert len(quality.calibration_deciles([1, 0, 1], [0.2, 0.4, 0.9])) == 3


def test_one_class_has_no_auc_but_the_rest() -> None:
    q = quality.quality([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(q.roc_auc)
    assert q.brier == pytest.approx((0.01 + 0.04 + 0.09) / 3)


def test_the_exporter_reports_with_the_service_s_measures() -> None:
    """One implementation: offline metrics are the service's functions, not a copy of them."""
    assert offline.roc_auc is quality.roc_auc
    y, p = _data(5)
    m = offline.binary_metrics(y, p, 0.3)
    assert (m.roc_auc, m.brier, m.log_loss) == (
        quality.roc_auc(y, p),
        quality.brier(y, p),
        quality.log_loss(y, p),
    )


def _exact_ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(
        np.max(np.abs(np.searchsorted(a, x, "right") / a.size - np.searchsorted(b, x, "right") / b.size))
    )


def test_the_reference_has_deciles_and_psi_ks_behave() -> None:
    rng = np.random.default_rng(0)
    evaluation = rng.beta(2, 8, 20_000)
    ref = ScoreReference.of(evaluation)
    assert len(ref.edges) == 9
    assert ref.proportions == pytest.approx([0.1] * 10)
    assert psi(ref, evaluation) == 0.0
    assert ks(ref, evaluation) == 0.0
    same, shifted = rng.beta(2, 8, 5000), rng.beta(3, 8, 5000)
    assert psi(ref, same) < 0.02 < 0.2 < psi(ref, shifted)
    for live in (same, shifted, rng.beta(2, 8, 40)):
        assert abs(ks(ref, live) - _exact_ks(evaluation, live)) <= 1 / GRID_STEPS
    # psi by hand over the bins, floors included
    live = np.maximum(bin_counts(ref, shifted) / shifted.size, 1e-4)
    want = float(np.sum((live - 0.1) * np.log(live / 0.1)))
    assert psi(ref, shifted) == pytest.approx(want, rel=1e-12)


def test_a_score_on_an_edge_falls_in_the_bin_that_edge_closes() -> None:
    ref = ScoreReference.of(np.arange(1, 101) / 100)
    assert ref.edges[0] == 0.1
    assert bin_counts(ref, np.array([0.1, 0.10000001, 0.0]))[:2].tolist() == [2, 1]


def test_tied_scores_make_fewer_bins_never_empty_ones() -> None:
    ref = ScoreReference.of([0.2] * 50 + [0.7] * 50)
    assert ref.edges == (0.2,)
    assert ref.proportions == (0.5, 0.5)


def test_the_reference_round_trips_and_a_broken_one_is_refused() -> None:
    ref = ScoreReference.of(np.random.default_rng(1).random(500))
    assert ScoreReference.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    broken = ref.to_dict() | {"proportions": [0.5, 0.5]}
    with pytest.raises(ValueError, match="proportions"):
        ScoreReference.from_dict(broken)
    with pytest.raises(ValueError, match="increasing"):
        ScoreReference.from_dict(ref.to_dict() | {"edges": list(reversed(ref.edges))})


def test_a_model_file_with_or_without_a_reference_loads(tmp_path: Path) -> None:
    from service.config import Settings

    settings = Settings(providers=("CPUExecutionProvider",))
    ref = ScoreReference.of(np.linspace(0.1, 0.9, 300))
    with_ref = write_model(tmp_path / "with.onnx", metadata=make_metadata(score_reference=ref))
    without = write_model(tmp_path / "without.onnx", metadata=make_metadata())
    assert load_predictor(settings, with_ref).metadata.score_reference == ref
    assert load_predictor(settings, without).metadata.score_reference is None
    assert "score_reference" not in make_metadata().to_dict()  # older readers see what they knew
    props = make_metadata(score_reference=ref).to_props()
    data = json.loads(props["purchase_intent"])
    data["score_reference"]["cdf"][-1] = 0.5
    with pytest.raises(ArtifactError, match="score reference"):
        ModelMetadata.from_props({**props, "purchase_intent": json.dumps(data)})


def test_the_score_window_keeps_the_most_recent_scores() -> None:
    window = ScoreWindow(5)
    window.extend(np.array([1.0, 2.0, 3.0]))
    assert sorted(window.values()) == [1.0, 2.0, 3.0]
    window.extend(np.array([4.0, 5.0, 6.0]))
    assert sorted(window.values()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    window.extend(np.arange(10.0, 22.0))  # more than it holds, in one call
    assert sorted(window.values()) == [17.0, 18.0, 19.0, 20.0, 21.0]
    assert len(window) == 5


def _prediction(as_of: int, horizon_days: int = 10) -> Prediction:
    return Prediction("u", "v", as_of, horizon_days, 0.5, 0.0)


def test_an_outcome_is_a_purchase_in_the_horizon_to_the_second() -> None:
    t = 10_000 * DAY + 5
    p = _prediction(t)
    end = t + 10 * DAY

    def history(*stamps: int, folded: Folded | None = None) -> History:
        return History(list(stamps), [1.0] * len(stamps), [1] * len(stamps), folded)

    assert outcome_of(p, None) == UNOBSERVED
    assert outcome_of(p, history(t - 1, t)) == 0  # at as_of is before the window
    assert outcome_of(p, history(t + 1)) == 1
    assert outcome_of(p, history(end)) == 1
    assert outcome_of(p, history(end + 1)) == 0
    old = Folded(3, t // DAY - 90, t // DAY - 30, 9.0, 3.0)
    assert outcome_of(p, history(folded=old)) == 0  # folded well before the window
    reaching = Folded(3, t // DAY - 90, t // DAY + 2, 9.0, 3.0)
    assert outcome_of(p, history(folded=reaching)) == COMPACTED
    assert outcome_of(p, history(t + DAY * 5, folded=reaching)) == 1  # a raw purchase settles it


def _columns(users: list[str], as_of: list[int]) -> object:
    from service.columns import EventColumns

    n = len(users)
    return EventColumns(
        timestamps=np.zeros(0, np.int64),
        amounts=np.zeros(0),
        quantities=np.zeros(0),
        offsets=np.zeros(n + 1, np.int64),
        as_of=np.asarray(as_of, np.int64),
        user_ids=users,
    )


def test_the_recorder_keeps_the_first_per_user_version_and_day_and_stays_bounded() -> None:
    recorder = Recorder(sample_rate=1.0, max_users=5)
    t = 10_000 * DAY
    probs = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    assert recorder.add("v", 7, _columns(["a", "b", "a"], [t, t, t + 60]), probs, 1.0) == 0  # type: ignore[arg-type]
    assert recorder.add("v", 7, _columns(["c", "d", "e"], [t] * 3), probs, 2.0) == 3  # type: ignore[arg-type]
    drained = recorder.drain()
    assert [(p.user_id, p.probability, p.requested_at) for p in drained.predictions] == [
        ("a", float(np.float32(0.1)), 1.0),
        ("b", float(np.float32(0.2)), 1.0),
    ]
    assert (drained.duplicates, drained.sampled_out) == (1, 0)
    assert recorder.drain().predictions == []  # drained, and room again
    assert recorder.add("v", 7, _columns(["c", "d", "e"], [t] * 3), probs, 2.0) == 0  # type: ignore[arg-type]


def test_an_erased_user_leaves_the_buffer_and_the_others_stay() -> None:
    recorder = Recorder(sample_rate=1.0, max_users=6)
    t = 10_000 * DAY
    probs = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    assert recorder.add("v", 7, _columns(["a", "gone", "b"], [t, t + DAY, t]), probs, 1.0) == 0  # type: ignore[arg-type]
    assert recorder.add("v", 7, _columns(["gone"], [t]), probs[:1], 2.0) == 0  # type: ignore[arg-type]
    assert recorder.forget("gone") == 2
    assert recorder.forget("nobody") == 0
    # the room the erased rows took is free again: 2 waiting, 4 more fit
    assert recorder.add("v", 7, _columns(["c", "d", "e"], [t] * 3), probs, 3.0) == 0  # type: ignore[arg-type]
    drained = recorder.drain()
    assert [(p.user_id, p.probability, p.as_of) for p in drained.predictions] == [
        ("a", float(np.float32(0.1)), t),
        ("b", float(np.float32(0.3)), t),
        ("c", float(np.float32(0.1)), t),
        ("d", float(np.float32(0.2)), t),
        ("e", float(np.float32(0.3)), t),
    ]


def test_sampling_keeps_a_user_always_or_never() -> None:
    t = 10_000 * DAY
    users = [f"user-{k}" for k in range(2000)]
    kept = []
    for _ in range(2):
        recorder = Recorder(sample_rate=0.25, max_users=10_000)
        recorder.add("v", 7, _columns(users, [t] * len(users)), np.zeros(len(users), np.float32), 0.0)  # type: ignore[arg-type]
        drained = recorder.drain()
        kept.append({p.user_id for p in drained.predictions})
        assert drained.sampled_out == len(users) - len(kept[-1])
    assert kept[0] == kept[1]
    assert 0.2 < len(kept[0]) / len(users) < 0.3
