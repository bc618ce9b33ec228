"""Baselines the network must beat, all fed from the same :class:`service.features.UserSummary`.

* :class:`BGNBD` - the classic buy-till-you-die model (Fader, Hardie & Lee 2005) on (x, t_x, T),
  scored in closed form as P(at least one purchase in the horizon).
* :class:`LogRegRFM` and :class:`LightGBMRFM` - discriminative models on the RFM matrix, trained
  on the same label as the network: does the network learn anything beyond RFM?

Time is in weeks, as in lifetimes: ``recency`` is the time from the first to the latest purchase
(not the time since the latest one) and ``T`` the customer's age at ``as_of``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_export.metrics import PROBA_EPS
from service.features import UserSummary

#: The baselines' names in reports and score tables, in the order they are shown.
BASELINES = ("bgnbd", "logreg_rfm", "lightgbm")

DAYS_PER_WEEK = 7.0

#: Columns of :func:`rfm_matrix`, in order.
RFM_COLUMNS: tuple[str, ...] = (
    "log1p_frequency",  # log1p(repeat purchase days)
    "recency_weeks",  # weeks between first and latest purchase
    "age_weeks",  # weeks since first purchase (T)
    "weeks_since_last",  # T - recency: weeks since the latest purchase
    "log1p_monetary",  # log1p(mean spend per purchase day)
    "log1p_total_quantity",  # log1p(units bought up to as_of)
)


@dataclass(frozen=True)
class RFM:
    """Per-user recency / frequency / monetary view, float64 arrays of equal length."""

    frequency: NDArray[np.float64]
    recency_weeks: NDArray[np.float64]
    age_weeks: NDArray[np.float64]
    monetary: NDArray[np.float64]
    total_quantity: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.frequency.shape[0])

    def subset(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> RFM:
        """The same users' rows selected by an index or mask (train / validation / test splits)."""
        return RFM(
            frequency=self.frequency[index],
            recency_weeks=self.recency_weeks[index],
            age_weeks=self.age_weeks[index],
            monetary=self.monetary[index],
            total_quantity=self.total_quantity[index],
        )


def rfm_from_summary(s: UserSummary) -> RFM:
    """Turn the encoder's whole-history summary into RFM.

    Users without a purchase have no BG/NBD history (x, t_x and T are undefined), so they are
    rejected rather than silently given T = 0.
    """
    days = np.asarray(s.purchase_days, dtype=np.int64)
    if np.any(days < 1):
        raise ValueError(f"{int(np.sum(days < 1))} users have no purchase up to as_of; RFM needs >= 1")
    first = np.asarray(s.first_age_days, dtype=np.float64)
    last = np.asarray(s.last_age_days, dtype=np.float64)
    return RFM(
        frequency=(days - 1).astype(np.float64),
        recency_weeks=(first - last) / DAYS_PER_WEEK,
        age_weeks=first / DAYS_PER_WEEK,
        monetary=np.asarray(s.total_amount, dtype=np.float64) / days,
        total_quantity=np.asarray(s.total_quantity, dtype=np.float64).copy(),
    )


def rfm_matrix(r: RFM) -> NDArray[np.float64]:
    """Feature matrix ``[n_users, len(RFM_COLUMNS)]`` for the discriminative baselines.

    Counts and money are heavy-tailed, so they enter as log1p; a linear model then sees roughly
    symmetric inputs, and the trees do not care either way.
    """
    since_last = r.age_weeks - r.recency_weeks
    columns = (
        np.log1p(r.frequency),
        r.recency_weeks,
        r.age_weeks,
        since_last,
        np.log1p(np.maximum(r.monetary, 0.0)),
        np.log1p(np.maximum(r.total_quantity, 0.0)),
    )
    return np.column_stack(columns).astype(np.float64)


def _clip(p: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.clip(p, PROBA_EPS, 1.0 - PROBA_EPS)


class BGNBD:
    """BG/NBD fitted with lifetimes, scored as P(>= 1 purchase in ``(T, T + horizon]``).

    Given the history, the customer is alive with probability ``P_alive`` and then has a purchase
    rate ``lambda ~ Gamma(r + x, alpha + T)``. A BG/NBD customer can only drop out right after a
    purchase, so an alive customer makes no purchase in a window of length ``t`` with probability
    ``E[exp(-lambda t)] = ((alpha + T) / (alpha + T + t)) ** (r + x)``, and a dead one never buys:

        P = P_alive * (1 - ((alpha + T) / (alpha + T + t)) ** (r + x))
    """

    def __init__(self, penalizer: float = 0.001) -> None:
        self.penalizer = penalizer
        self._params: dict[str, float] | None = None

    @property
    def params(self) -> dict[str, float]:
        """Fitted ``r, alpha, a, b`` (``alpha`` in weeks)."""
        if self._params is None:
            raise RuntimeError("BGNBD is not fitted; call fit() first")
        return dict(self._params)

    def fit(self, r: RFM) -> BGNBD:
        """Maximum likelihood on the training users (raises lifetimes' ConvergenceError if it fails)."""
        if len(r) == 0:
            raise ValueError("cannot fit BG/NBD on zero users")
        if float(np.max(r.age_weeks)) <= 0.0:
            raise ValueError("cannot fit BG/NBD when every customer has age T == 0")
        # Many users share a pattern (whole days / 7); fitting the distinct patterns with weights
        # gives the same likelihood (lifetimes averages it by the weight sum) for less work.
        patterns = np.column_stack([r.frequency, r.recency_weeks, r.age_weeks])
        unique, counts = np.unique(patterns, axis=0, return_counts=True)
        # lifetimes installs global warning filters when imported and inside its likelihood, and
        # autograd / pandas emit deprecation noise; catch_warnings restores the caller's filters.
        # The import is deferred for the same reason: importing this module must not touch them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from lifetimes import BetaGeoFitter

            fitter = BetaGeoFitter(penalizer_coef=self.penalizer)
            fitter.fit(unique[:, 0], unique[:, 1], unique[:, 2], weights=counts)
        params = fitter.params_
        self._params = {k: float(params[k]) for k in ("r", "alpha", "a", "b")}
        return self

    def probability_alive(self, r: RFM) -> NDArray[np.float64]:
        """P(alive at T | x, t_x, T) in closed form (Fader, Hardie & Lee, note 021), in log space."""
        p = self.params
        x, t_x, T = r.frequency, r.recency_weeks, r.age_weeks
        log_odds_dead = (p["r"] + x) * (np.log(p["alpha"] + T) - np.log(p["alpha"] + t_x)) + np.log(
            p["a"] / (p["b"] + np.maximum(x, 1.0) - 1.0)
        )
        # 1 / (1 + exp(z)) without overflow for large z
        alive = np.exp(-np.logaddexp(0.0, log_odds_dead))
        # no repeat purchase yet means no chance to have dropped out
        return np.where(x == 0, 1.0, alive).astype(np.float64)

    def predict_proba(self, r: RFM, horizon_weeks: float) -> NDArray[np.float64]:
        """P(at least one purchase in ``(T, T + horizon_weeks]``), clipped to ``[1e-7, 1 - 1e-7]``."""
        if horizon_weeks <= 0:
            raise ValueError(f"horizon_weeks must be > 0, got {horizon_weeks}")
        p = self.params
        alive = self.probability_alive(r)
        # 1 - ((alpha+T)/(alpha+T+t))**(r+x) == -expm1(-(r+x) * log1p(t/(alpha+T))), exact for tiny t
        buys_if_alive = -np.expm1(
            -(p["r"] + r.frequency) * np.log1p(horizon_weeks / (p["alpha"] + r.age_weeks))
        )
        return _clip(alive * buys_if_alive)


class LogRegRFM:
    """Standardised RFM into an L2 logistic regression: the linear reference point."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000) -> None:
        self.C = C
        self.max_iter = max_iter
        self._model: Any = None

    def fit(self, X: NDArray[np.float64], y: NDArray[Any]) -> LogRegRFM:
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=self.C, solver="lbfgs", max_iter=self.max_iter),
        )
        model.fit(np.asarray(X, dtype=np.float64), np.asarray(y).astype(np.int64))
        self._model = model
        return self

    def predict_proba(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """Probability of the positive class, clipped to ``[1e-7, 1 - 1e-7]``."""
        if self._model is None:
            raise RuntimeError("LogRegRFM is not fitted; call fit() first")
        proba = self._model.predict_proba(np.asarray(X, dtype=np.float64))[:, 1]
        return _clip(np.asarray(proba, dtype=np.float64))


class LightGBMRFM:
    """Gradient-boosted trees on the RFM matrix: the strongest non-sequential baseline.

    Deterministic by construction (``deterministic``, row-wise histograms, a fixed thread count
    and seed), so two fits on the same data give identical predictions and reports are
    reproducible. Early stopping watches the validation log loss, a proper scoring rule, rather
    than AUC, so the kept model is also the better-calibrated one.

    One thread by default: a few thousand rows by six columns gain nothing from more, and when the
    cores are busy (torch training next door) LightGBM's OpenMP threads spin at every barrier and
    a fit becomes many times slower (docs/model.md, "Protocols").
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        learning_rate: float = 0.03,
        num_leaves: int = 15,
        min_child_samples: int = 50,
        n_estimators: int = 2000,
        early_stopping_rounds: int = 100,
        num_threads: int = 1,
    ) -> None:
        self.seed = seed
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.n_estimators = n_estimators
        self.early_stopping_rounds = early_stopping_rounds
        self.num_threads = num_threads
        self._model: Any = None

    @property
    def best_iteration(self) -> int:
        """Boosting rounds kept after early stopping."""
        if self._model is None:
            raise RuntimeError("LightGBMRFM is not fitted; call fit() first")
        return int(self._model.best_iteration_)

    def fit(
        self,
        X: NDArray[np.float64],
        y: NDArray[Any],
        X_val: NDArray[np.float64],
        y_val: NDArray[Any],
    ) -> LightGBMRFM:
        model = lgb.LGBMClassifier(
            objective="binary",
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            num_leaves=self.num_leaves,
            min_child_samples=self.min_child_samples,
            subsample=0.8,
            subsample_freq=1,
            colsample_bytree=0.9,
            reg_lambda=1.0,
            seed=self.seed,
            deterministic=True,
            force_row_wise=True,
            num_threads=self.num_threads,
            verbose=-1,
        )
        X_eval, y_eval = np.asarray(X_val, dtype=np.float64), np.asarray(y_val).astype(np.int64)
        # lightgbm 4.7 deprecates eval_set for eval_X / eval_y; older 4.x only has eval_set
        if "eval_X" in inspect.signature(model.fit).parameters:
            eval_kwargs: dict[str, Any] = {"eval_X": X_eval, "eval_y": y_eval}
        else:
            eval_kwargs = {"eval_set": [(X_eval, y_eval)]}
        model.fit(
            np.asarray(X, dtype=np.float64),
            np.asarray(y).astype(np.int64),
            **eval_kwargs,
            eval_metric="binary_logloss",
            callbacks=[lgb.early_stopping(self.early_stopping_rounds, first_metric_only=True, verbose=False)],
        )
        self._model = model
        return self

    def predict_proba(self, X: NDArray[np.float64], *, threads: int | None = None) -> NDArray[np.float64]:
        """Probability of the positive class at the best iteration, clipped to ``[1e-7, 1 - 1e-7]``.

        ``threads``: OpenMP threads for this call (default: the fit's). Each row is scored on its
        own, so the count changes the time, never the numbers.
        """
        if self._model is None:
            raise RuntimeError("LightGBMRFM is not fitted; call fit() first")
        more = {} if threads is None else {"num_threads": threads}
        proba = self._model.predict_proba(np.asarray(X, dtype=np.float64), **more)[:, 1]
        return _clip(np.asarray(proba, dtype=np.float64))
