"""Evaluation: metrics against sklearn and by hand, the paired bootstrap, calibration, plots, the report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from model_export.data import CleaningReport
from model_export.metrics import (
    METRIC_KEYS,
    best_f1_threshold,
    binary_metrics,
    bootstrap_auc_diffs,
    bootstrap_aucs,
    expected_calibration_error,
    paired_bootstrap_auc,
    reliability_table,
    roc_auc,
)
from model_export.plots import plot_calibration, plot_roc
from model_export.report import (
    BacktestCutoff,
    BacktestQuote,
    DataSummary,
    Report,
    SeedRun,
    SplitSizes,
    Target,
    render_markdown,
    write_report,
)
from service.features import FeatureSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic(
    n: int, separation: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Labels, a model with the given separation, and a pure-noise model on the same users."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    good = 1.0 / (1.0 + np.exp(-(separation * (y - 0.5) + rng.normal(0.0, 1.0, n))))
    noise = rng.random(n)
    return y, good, noise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 3000)
    # heavy ties: scores on a coarse grid, plus a block of identical scores across both classes
    p = np.round(rng.random(3000) * 0.5 + 0.3 * y, 2)
    p[:500] = 0.42
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    p32 = p.astype(np.float32)
    assert roc_auc(y, p32) == pytest.approx(roc_auc_score(y, p32), abs=1e-12)


def test_roc_auc_extremes_and_single_class() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_binary_metrics_hand_checked() -> None:
    y = np.array([1, 0, 1, 0, 1])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.2])
    m = binary_metrics(y, p, threshold=0.5)
    # predicted positive: 0.9 (tp), 0.8 (fp), 0.6 (tp); missed: 0.2 (fn); 0.3 is a tn
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.threshold == 0.5
    # positive/negative pairs won: 0.9 beats both, 0.6 beats 0.3, 0.2 beats none -> 3 of 6
    assert m.roc_auc == pytest.approx(3 / 6)
    # average precision: precision at each positive's rank (1, 2/3, 3/5), averaged
    assert m.pr_auc == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert m.brier == pytest.approx(np.mean((p - y) ** 2))
    assert m.log_loss == pytest.approx(log_loss(y, p))


def test_binary_metrics_nothing_predicted_positive_is_zero_without_warning() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    with np.errstate(all="raise"):
        m = binary_metrics(y, p, threshold=0.9)
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
    assert m.accuracy == 0.5


def test_log_loss_is_finite_for_confident_mistakes() -> None:
    m = binary_metrics([0, 1], [1.0, 0.0], threshold=0.5)
    assert math.isfinite(m.log_loss)
    assert m.log_loss == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_best_f1_threshold_reproduces_the_maximum_f1() -> None:
    y, p, _ = synthetic(2000, separation=1.5, seed=3)
    p = np.round(p, 3)  # ties, so the rule `p >= t` must be the curve's own rule
    t = best_f1_threshold(y, p)
    assert t in set(p.tolist())
    f1_at_t = f1_score(y, p >= t)
    every = max(f1_score(y, p >= c) for c in np.unique(p))
    assert f1_at_t == pytest.approx(every, abs=1e-12)
    assert binary_metrics(y, p, t).f1 == pytest.approx(f1_at_t, abs=1e-12)


def test_bootstrap_better_model_ci_above_zero() -> None:
    y, good, noise = synthetic(3000, separation=2.0, seed=4)
    out = paired_bootstrap_auc(y, good, noise, n_boot=500, seed=0)
    lo, hi = out.ci95
    assert out.auc_diff == pytest.approx(roc_auc(y, good) - roc_auc(y, noise))
    assert lo <= out.auc_diff <= hi
    assert lo > 0.0
    assert out.p_value_one_sided == 0.0
    assert out.n_boot == 500


def test_bootstrap_identical_models_straddle_zero_and_seed_is_reproducible() -> None:
    y, good, _ = synthetic(2000, separation=1.0, seed=5)
    rng = np.random.default_rng(6)
    # two equally good, different models: same signal, independent noise
    other = 1.0 / (1.0 + np.exp(-(1.0 * (y - 0.5) + rng.normal(0.0, 1.0, y.size))))
    out = paired_bootstrap_auc(y, good, other, n_boot=400, seed=1)
    lo, hi = out.ci95
    assert lo < 0.0 < hi
    assert 0.02 < out.p_value_one_sided < 0.98
    assert paired_bootstrap_auc(y, good, other, n_boot=400, seed=1) == out

    same = paired_bootstrap_auc(y, good, good, n_boot=100, seed=1)
    assert same.auc_diff == 0.0
    assert same.ci95 == (0.0, 0.0)


def test_bootstrap_matches_a_naive_resampling_loop() -> None:
    y, good, noise = synthetic(300, separation=1.0, seed=7)
    good = np.round(good, 2)
    fast = paired_bootstrap_auc(y, good, noise, n_boot=50, seed=11)
    # same draws as the implementation: one chunk of [n_boot, n] indices from the same generator
    idx = np.random.default_rng(11).integers(0, y.size, size=(50, y.size))
    diffs = [roc_auc_score(y[i], good[i]) - roc_auc_score(y[i], noise[i]) for i in idx]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert fast.ci95 == pytest.approx((lo, hi), abs=1e-12)
    assert fast.p_value_one_sided == pytest.approx(np.mean(np.array(diffs) <= 0))


def test_replicates_scored_apart_pair_up_as_scored_together() -> None:
    """Models scored in one call or one at a time (training scores LightGBM last) give the same
    replicates, so their differences are the paired bootstrap, bit for bit; small samples (several
    replicates per chunk) and large ones (one per chunk) alike."""
    for n, n_boot in ((400, 300), (400_000, 5)):
        y, good, noise = synthetic(n, separation=1.0, seed=9)
        models = {"good": good, "noise": noise, "rounded": np.round(good, 2), "coarse": np.round(noise, 1)}
        together = bootstrap_aucs(y, models, n_boot=n_boot, seed=3)
        for name, p in models.items():
            np.testing.assert_array_equal(
                bootstrap_aucs(y, {name: p}, n_boot=n_boot, seed=3)[name], together[name]
            )
            diffs = bootstrap_auc_diffs(y, good, p, n_boot=n_boot, seed=3)
            np.testing.assert_array_equal(together["good"] - together[name], diffs)


def test_bootstrap_skips_single_class_replicates() -> None:
    y = np.array([1] + [0] * 9)
    p = np.linspace(0.0, 1.0, 10)
    out = paired_bootstrap_auc(y, p, p[::-1], n_boot=200, seed=0)
    # P(no positive drawn) = 0.9**10 ~ 35%: those replicates are dropped, not counted as ties
    assert 80 < out.n_boot < 180


def test_reliability_rows_cover_every_user_and_ece() -> None:
    y = np.array([0, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.55, 0.55, 0.95, 1.0])
    rows = reliability_table(y, p, n_bins=10)
    assert sum(r.count for r in rows) == y.size
    assert [r.bin_lower for r in rows] == pytest.approx([0.0, 0.1, 0.5, 0.9])
    last = rows[-1]  # 1.0 lands in the top bin, not in an 11th
    assert last.count == 2
    assert last.mean_predicted == pytest.approx(0.975)
    assert last.observed_rate == 1.0
    expected = (1 * 0.05 + 1 * 0.85 + 2 * 0.05 + 2 * 0.025) / 6
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(expected)


def test_perfectly_calibrated_scores_have_small_ece() -> None:
    rng = np.random.default_rng(9)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(np.int64)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0.0, 1.0)) > 0.1


def test_plots_write_png(tmp_path: Path) -> None:
    y, good, noise = synthetic(500, separation=1.5, seed=10)
    scores = {"good": good, "noise": noise}
    plot_roc(y, scores, tmp_path / "roc.png")
    plot_calibration(y, scores, tmp_path / "calibration.png")
    for name in ("roc.png", "calibration.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5_000


def example_report() -> Report:
    y, good, noise = synthetic(400, separation=1.5, seed=12)
    rng = np.random.default_rng(13)
    scores = {"cln": good, "bgnbd": noise, "logreg_rfm": rng.random(y.size), "lightgbm": rng.random(y.size)}
    models = {name: binary_metrics(y, p, best_f1_threshold(y, p)) for name, p in scores.items()}
    boot = {f"cln_vs_{b}": paired_bootstrap_auc(y, good, scores[b], n_boot=200) for b in list(scores)[1:]}
    quote = BacktestQuote(
        source="models/backtest/backtest.json",
        created_at="1998-07-01T00:00:00Z",
        horizon_weeks=13,
        same_data_and_settings=False,
        differences=["data", "hidden"],
        cutoffs=[BacktestCutoff("1998-03-31", 900, 0.25, 0.8, "lightgbm", 0.79, 0.7, 0.15, 0.16)],
        mean_auc={"cln": 0.8, "lightgbm": 0.79},
        mean_diff_vs_best=boot["cln_vs_lightgbm"],
        best_baseline_by_mean_auc="lightgbm",
        worst_auc_gap={"gap": 0.01, "where": "1998-03-31", "ci95": [-0.01, 0.03]},
        worst_brier_gap={"gap": -0.01, "where": "1998-03-31"},
        targets={"never_below_recency": True},
    )
    return Report(
        protocol="customer-split",
        cutoff="1997-09-30",
        horizon_weeks=39,
        n_users=400,
        base_rate=float(y.mean()),
        train_seconds=1.5,
        onnx_parity_max_abs_diff=3e-7,
        model_version="cln-test",
        created_at="1998-07-01T00:00:00Z",
        n_parameters=1234,
        data=DataSummary(
            "cdnow", "abc123", CleaningReport(source="cdnow", rows_read=69659, merged_same_day=3)
        ),
        split=SplitSizes(240, 480, 2, 80, 80, "1997-09-30T23:59:59+00:00", "1997-09-30T23:59:59+00:00"),
        models=models,
        bootstrap=boot,
        reliability={name: reliability_table(y, p) for name, p in scores.items()},
        target=Target.of(models, boot),
        hyperparameters={"lr": 0.001, "channels": ["purchases", "active"]},
        backtest=quote,
        feature_spec=FeatureSpec(lookback_bins=39),
        per_seed=[SeedRun(0, 4, 3, 0.45, 0.77), SeedRun(1, 4, 4, 0.44, 0.78)],
        plots={"roc": "roc.png", "calibration": "calibration.png"},
    )


def test_write_report_renders_every_section(tmp_path: Path) -> None:
    report = example_report()
    write_report(report, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())
    assert loaded["models"]["cln"]["roc_auc"] == report.models["cln"].roc_auc
    md = (tmp_path / "out" / "report.md").read_text()
    title = md.splitlines()[0]
    assert title.startswith("# ")
    for text in ("customer-split", "1997-09-30", "39 weeks"):
        assert text in title
    cln_row = next(line for line in md.splitlines() if line.startswith("| cln |"))
    assert f"{report.models['cln'].roc_auc:.4f}" in cln_row
    assert cln_row.count("|") == len(METRIC_KEYS) + 2
    assert any(line.startswith("| bgnbd |") for line in md.splitlines())
    boot_row = next(line for line in md.splitlines() if line.startswith("| cln_vs_bgnbd |"))
    assert "| yes |" in boot_row  # the CI is above zero
    for text in (
        "- seeds: [0, 1]",
        "- validation AUC per seed: 0.7700, 0.7800",
        "| rows_read | 69659 |",
        "| train | 240 |",
        "It differs from this model in: data, hidden.",
        "| 1998-03-31 | 900 | 25% |",
        "![roc](roc.png)",
    ):
        assert text in md
    # no temporary files left next to the outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]


def test_report_round_trips_through_json() -> None:
    report = example_report()
    text = report.to_json()
    assert Report.from_json(text) == report
    loaded = json.loads(text)
    # the per-seed views sit next to the full records, and the spec carries its derived fields
    assert (loaded["seeds"], loaded["per_seed_val_auc"]) == ([0, 1], [0.77, 0.78])
    assert loaded["feature_spec"]["lookback_days"] == 39 * 7
    assert loaded["bootstrap"]["cln_vs_bgnbd"]["ci95"] == list(report.bootstrap["cln_vs_bgnbd"].ci95)


def test_report_from_json_names_a_missing_field() -> None:
    loaded = json.loads(example_report().to_json())
    del loaded["split"]["test_as_of"]
    with pytest.raises(ValueError, match="SplitSizes lacks test_as_of"):
        Report.from_json(json.dumps(loaded))


def test_render_markdown_leaves_out_a_missing_backtest() -> None:
    report = example_report()
    heading = "## Expected performance: rolling-origin backtest"
    assert heading in render_markdown(report)
    assert heading not in render_markdown(dataclasses.replace(report, backtest=None))


def test_write_report_refuses_nan_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        write_report(dataclasses.replace(example_report(), base_rate=float("nan")), tmp_path)
    assert list(tmp_path.iterdir()) == []
