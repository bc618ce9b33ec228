"""Baselines: RFM from the shared encoder, BG/NBD's closed form, and the RFM classifiers on CDNOW."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray

from model_export.baselines import (
    BGNBD,
    RFM,
    RFM_COLUMNS,
    LightGBMRFM,
    LogRegRFM,
    rfm_from_summary,
    rfm_matrix,
)
from model_export.metrics import roc_auc
from service.features import SECONDS_PER_DAY, summarise

HORIZON_WEEKS = 39
DAY = SECONDS_PER_DAY


def cdnow_path() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lifetimes
    return Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"


@dataclass(frozen=True)
class Cdnow:
    rfm: RFM
    X: NDArray[np.float64]
    y: NDArray[np.int64]
    train: NDArray[np.intp]  # fit here (LightGBM: minus `val`)
    val: NDArray[np.intp]  # a slice of `train`, for early stopping only
    test: NDArray[np.intp]


@pytest.fixture(scope="module")
def cdnow() -> Cdnow:
    """All CDNOW users at the end of 1997-09-30, labelled by any purchase in the next 39 weeks."""
    frame = pd.read_csv(cdnow_path(), sep=r"\s+", dtype={"customer_id": np.int64, "date": str})
    frame = frame.sort_values("customer_id", kind="stable")
    ts = (
        pd.to_datetime(frame["date"], format="%Y%m%d").to_numpy("datetime64[s]").astype(np.int64)
    )  # midnight UTC
    ids, counts = np.unique(frame["customer_id"].to_numpy(), return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    as_of = int(np.datetime64("1997-09-30T23:59:59", "s").astype(np.int64))
    summary = summarise(
        ts,
        frame["dollar_value"].to_numpy(np.float64),
        frame["number_of_cds"].to_numpy(np.float64),
        offsets,
        as_of,
    )
    user = np.repeat(np.arange(ids.size), counts)
    future = (ts > as_of) & (ts <= as_of + HORIZON_WEEKS * 7 * DAY)
    y = (np.bincount(user[future], minlength=ids.size) > 0).astype(np.int64)

    rfm = rfm_from_summary(summary)
    perm = np.random.default_rng(0).permutation(ids.size)
    n_test = ids.size // 5
    test, train = perm[:n_test], perm[n_test:]
    return Cdnow(rfm, rfm_matrix(rfm), y, train, train[: train.size // 5], test)


@pytest.fixture(scope="module")
def bgnbd(cdnow: Cdnow) -> BGNBD:
    return BGNBD().fit(cdnow.rfm.subset(cdnow.train))


def rfm_of(x: list[float], t_x: list[float], T: list[float]) -> RFM:
    n = len(x)
    return RFM(
        frequency=np.asarray(x, dtype=np.float64),
        recency_weeks=np.asarray(t_x, dtype=np.float64),
        age_weeks=np.asarray(T, dtype=np.float64),
        monetary=np.ones(n),
        total_quantity=np.ones(n),
    )


# --- RFM ---------------------------------------------------------------------------------------


def test_rfm_from_summary_follows_lifetimes_conventions() -> None:
    as_of = 1000 * DAY + 12 * 3600  # midday; ages count whole days
    # purchases 28, 21 (twice: one purchase day), 7 days before as_of, and one after it (ignored)
    ts = np.array([as_of - 28 * DAY, as_of - 21 * DAY, as_of - 21 * DAY + 60, as_of - 7 * DAY, as_of + DAY])
    amounts = np.array([10.0, 5.0, 1.0, 14.0, 99.0])
    qty = np.array([1.0, 2.0, 1.0, 1.0, 5.0])
    r = rfm_from_summary(summarise(ts, amounts, qty, [0, 5], as_of))
    assert r.frequency.tolist() == [2.0]  # three purchase days = two repeats
    assert r.recency_weeks.tolist() == [3.0]  # first to latest purchase
    assert r.age_weeks.tolist() == [4.0]  # first purchase to as_of
    assert r.monetary.tolist() == [10.0]  # 30 spent over three purchase days
    assert r.total_quantity.tolist() == [5.0]
    assert r.frequency.dtype == np.float64

    X = rfm_matrix(r)
    assert X.shape == (1, len(RFM_COLUMNS))
    row = dict(zip(RFM_COLUMNS, X[0].tolist(), strict=True))
    assert row["weeks_since_last"] == 1.0
    assert row["log1p_frequency"] == pytest.approx(np.log(3.0))


def test_rfm_rejects_users_without_a_purchase() -> None:
    s = summarise(np.array([5 * DAY]), np.array([1.0]), np.array([1.0]), [0, 1, 1], 10 * DAY)
    with pytest.raises(ValueError, match="no purchase"):
        rfm_from_summary(s)


def test_cdnow_fixture_matches_the_published_cohort(cdnow: Cdnow) -> None:
    assert len(cdnow.rfm) == 23_570
    assert 0.25 < cdnow.y.mean() < 0.35
    # everyone joined in Q1 1997, so T is between 26 and 39 weeks at the cutoff
    assert cdnow.rfm.age_weeks.min() >= 26.0
    assert cdnow.rfm.age_weeks.max() <= 39.0


# --- BG/NBD ------------------------------------------------------------------------------------


def test_bgnbd_params_and_probabilities_are_sane(cdnow: Cdnow, bgnbd: BGNBD) -> None:
    params = bgnbd.params
    assert set(params) == {"r", "alpha", "a", "b"}
    assert all(np.isfinite(v) and v > 0 for v in params.values())
    p = bgnbd.predict_proba(cdnow.rfm.subset(cdnow.test), HORIZON_WEEKS)
    assert np.all((p > 0.0) & (p < 1.0))
    assert roc_auc(cdnow.y[cdnow.test], p) > 0.7
    # BG/NBD ignores seasonality, but its average should still be near the observed rate
    assert abs(p.mean() - cdnow.y[cdnow.test].mean()) < 0.06


def test_bgnbd_more_frequent_and_more_recent_score_higher(bgnbd: BGNBD) -> None:
    T = 38.0
    by_recency = bgnbd.predict_proba(rfm_of([3] * 5, [2.0, 10.0, 20.0, 30.0, 37.0], [T] * 5), 39.0)
    assert np.all(np.diff(by_recency) > 0)
    # bought in the last week: more purchases means both more likely alive and a higher rate
    by_frequency = bgnbd.predict_proba(rfm_of([1, 2, 4, 8, 16], [37.0] * 5, [T] * 5), 39.0)
    assert np.all(np.diff(by_frequency) > 0)
    # a longer horizon can only add purchases
    one = rfm_of([2], [30.0], [T])
    assert bgnbd.predict_proba(one, 52.0)[0] > bgnbd.predict_proba(one, 13.0)[0]


def test_bgnbd_probability_alive_matches_lifetimes(bgnbd: BGNBD) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lifetimes import BetaGeoFitter

        reference = BetaGeoFitter()
        reference.params_ = pd.Series(bgnbd.params)
        r = rfm_of([0, 1, 3, 10, 40], [0.0, 5.0, 30.0, 12.0, 38.0], [30.0, 35.0, 38.0, 38.0, 39.0])
        expected = reference.conditional_probability_alive(r.frequency, r.recency_weeks, r.age_weeks)
    np.testing.assert_allclose(bgnbd.probability_alive(r), expected, rtol=1e-10, atol=1e-12)


def test_bgnbd_closed_form_matches_monte_carlo(bgnbd: BGNBD) -> None:
    """Sample (lambda, p) from the fitted priors, weight by each history's likelihood (split into
    "still alive" and "dropped out after the last purchase"), then simulate the next purchase."""
    params = bgnbd.params
    rng = np.random.default_rng(0)
    n = 1_000_000
    lam = rng.gamma(params["r"], 1.0 / params["alpha"], n)
    drop = rng.beta(params["a"], params["b"], n)
    next_purchase = rng.exponential(1.0, n) / lam  # memoryless: waiting time from T
    points = [(0, 0.0, 30.0), (1, 10.0, 35.0), (3, 30.0, 38.0), (5, 20.0, 36.0), (8, 37.0, 38.0)]
    for x, t_x, T in points:
        log_alive = x * np.log(lam) + x * np.log1p(-drop) - lam * T
        if x > 0:
            log_dead = np.log(drop) + (x - 1) * np.log1p(-drop) + x * np.log(lam) - lam * t_x
        else:
            log_dead = np.full(n, -np.inf)
        shift = max(log_alive.max(), log_dead.max())
        w_alive, w_dead = np.exp(log_alive - shift), np.exp(log_dead - shift)
        simulated = np.sum(w_alive * (next_purchase <= HORIZON_WEEKS)) / np.sum(w_alive + w_dead)
        closed = bgnbd.predict_proba(rfm_of([x], [t_x], [T]), HORIZON_WEEKS)[0]
        assert closed == pytest.approx(simulated, abs=0.01), (x, t_x, T)


def simulate_bgnbd(
    n: int, r: float, alpha: float, a: float, b: float, horizon: float, seed: int
) -> tuple[RFM, NDArray[np.int64]]:
    """Customers drawn from the BG/NBD process itself: history up to T, label in (T, T + horizon]."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(r, 1.0 / alpha, n)
    drop = rng.beta(a, b, n)
    T = rng.uniform(10.0, 40.0, n)
    x = np.zeros(n)
    t_x = np.zeros(n)
    bought_later = np.zeros(n, dtype=bool)
    now = np.zeros(n)
    active = np.ones(n, dtype=bool)  # alive and not yet past the label window
    while active.any():
        now[active] += rng.exponential(1.0, int(active.sum())) / lam[active]
        active &= now <= T + horizon
        in_history = active & (now <= T)
        x[in_history] += 1
        t_x[in_history] = now[in_history]
        bought_later |= active & (now > T)
        # the label only needs one future purchase; otherwise drop out after this purchase w.p. p
        active &= ~bought_later & (rng.random(n) >= drop)
    ones = np.ones(n)
    return RFM(x, t_x, T, ones, ones), bought_later.astype(np.int64)


def test_bgnbd_recovers_a_simulated_process_and_is_calibrated() -> None:
    truth = {"r": 0.5, "alpha": 5.0, "a": 0.8, "b": 2.5}
    train, _ = simulate_bgnbd(20_000, **truth, horizon=26.0, seed=1)
    test, y = simulate_bgnbd(20_000, **truth, horizon=26.0, seed=2)
    model = BGNBD(penalizer=0.0).fit(train)
    for name, value in truth.items():
        assert model.params[name] == pytest.approx(value, rel=0.25), name
    p = model.predict_proba(test, 26.0)
    assert p.mean() == pytest.approx(y.mean(), abs=0.01)
    # calibrated within each decile of the prediction, not just on average
    order = np.argsort(p)
    for chunk in np.array_split(order, 10):
        assert p[chunk].mean() == pytest.approx(y[chunk].mean(), abs=0.03)


def test_bgnbd_must_be_fitted_first() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        BGNBD().predict_proba(rfm_of([1], [1.0], [2.0]), 10.0)


# --- RFM classifiers -----------------------------------------------------------------------------


def test_logreg_beats_random_on_cdnow(cdnow: Cdnow) -> None:
    model = LogRegRFM().fit(cdnow.X[cdnow.train], cdnow.y[cdnow.train])
    p = model.predict_proba(cdnow.X[cdnow.test])
    assert np.all((p > 0.0) & (p < 1.0))
    assert roc_auc(cdnow.y[cdnow.test], p) > 0.7


def test_lightgbm_beats_random_and_is_deterministic(cdnow: Cdnow) -> None:
    fit_rows = np.setdiff1d(cdnow.train, cdnow.val)

    def fit() -> LightGBMRFM:
        return LightGBMRFM(seed=3).fit(
            cdnow.X[fit_rows], cdnow.y[fit_rows], cdnow.X[cdnow.val], cdnow.y[cdnow.val]
        )

    first, second = fit(), fit()
    p = first.predict_proba(cdnow.X[cdnow.test])
    np.testing.assert_array_equal(p, second.predict_proba(cdnow.X[cdnow.test]))
    assert first.best_iteration == second.best_iteration
    assert 0 < first.best_iteration < 2000  # early stopping kicked in
    assert np.all((p > 0.0) & (p < 1.0))
    assert roc_auc(cdnow.y[cdnow.test], p) > 0.7
