"""Evaluation: metrics against sklearn and by hand, the paired bootstrap, calibration, plots, report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from model_export.evaluate import (
    METRIC_KEYS,
    best_f1_threshold,
    binary_metrics,
    expected_calibration_error,
    paired_bootstrap_auc,
    plot_calibration,
    plot_roc,
    reliability_table,
    render_markdown,
    roc_auc,
    write_report,
)

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
    assert list(m) == list(METRIC_KEYS)
    # predicted positive: 0.9 (tp), 0.8 (fp), 0.6 (tp); missed: 0.2 (fn); 0.3 is a tn
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["threshold"] == 0.5
    # positive/negative pairs won: 0.9 beats both, 0.6 beats 0.3, 0.2 beats none -> 3 of 6
    assert m["roc_auc"] == pytest.approx(3 / 6)
    # average precision: precision at each positive's rank (1, 2/3, 3/5), averaged
    assert m["pr_auc"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["log_loss"] == pytest.approx(log_loss(y, p))


def test_binary_metrics_nothing_predicted_positive_is_zero_without_warning() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    with np.errstate(all="raise"):
        m = binary_metrics(y, p, threshold=0.9)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == 0.5


def test_log_loss_is_finite_for_confident_mistakes() -> None:
    m = binary_metrics([0, 1], [1.0, 0.0], threshold=0.5)
    assert math.isfinite(m["log_loss"])
    assert m["log_loss"] == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_best_f1_threshold_reproduces_the_maximum_f1() -> None:
    y, p, _ = synthetic(2000, separation=1.5, seed=3)
    p = np.round(p, 3)  # ties, so the rule `p >= t` must be the curve's own rule
    t = best_f1_threshold(y, p)
    assert t in set(p.tolist())
    f1_at_t = f1_score(y, p >= t)
    every = max(f1_score(y, p >= c) for c in np.unique(p))
    assert f1_at_t == pytest.approx(every, abs=1e-12)
    assert binary_metrics(y, p, t)["f1"] == pytest.approx(f1_at_t, abs=1e-12)


def test_bootstrap_better_model_ci_above_zero() -> None:
    y, good, noise = synthetic(3000, separation=2.0, seed=4)
    out = paired_bootstrap_auc(y, good, noise, n_boot=500, seed=0)
    lo, hi = out["ci95"]
    assert out["auc_diff"] == pytest.approx(roc_auc(y, good) - roc_auc(y, noise))
    assert lo <= out["auc_diff"] <= hi
    assert lo > 0.0
    assert out["p_value_one_sided"] == 0.0
    assert out["n_boot"] == 500


def test_bootstrap_identical_models_straddle_zero_and_seed_is_reproducible() -> None:
    y, good, _ = synthetic(2000, separation=1.0, seed=5)
    rng = np.random.default_rng(6)
    # two equally good, different models: same signal, independent noise
    other = 1.0 / (1.0 + np.exp(-(1.0 * (y - 0.5) + rng.normal(0.0, 1.0, y.size))))
    out = paired_bootstrap_auc(y, good, other, n_boot=400, seed=1)
    lo, hi = out["ci95"]
    assert lo < 0.0 < hi
    assert 0.02 < out["p_value_one_sided"] < 0.98
    assert paired_bootstrap_auc(y, good, other, n_boot=400, seed=1) == out

    same = paired_bootstrap_auc(y, good, good, n_boot=100, seed=1)
    assert same["auc_diff"] == 0.0
    assert same["ci95"] == [0.0, 0.0]


def test_bootstrap_matches_a_naive_resampling_loop() -> None:
    y, good, noise = synthetic(300, separation=1.0, seed=7)
    good = np.round(good, 2)
    fast = paired_bootstrap_auc(y, good, noise, n_boot=50, seed=11)
    # same draws as the implementation: one chunk of [n_boot, n] indices from the same generator
    idx = np.random.default_rng(11).integers(0, y.size, size=(50, y.size))
    diffs = [roc_auc_score(y[i], good[i]) - roc_auc_score(y[i], noise[i]) for i in idx]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert fast["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert fast["p_value_one_sided"] == pytest.approx(np.mean(np.array(diffs) <= 0))


def test_bootstrap_skips_single_class_replicates() -> None:
    y = np.array([1] + [0] * 9)
    p = np.linspace(0.0, 1.0, 10)
    out = paired_bootstrap_auc(y, p, p[::-1], n_boot=200, seed=0)
    # P(no positive drawn) = 0.9**10 ~ 35%: those replicates are dropped, not counted as ties
    assert 80 < out["n_boot"] < 180


def test_bootstrap_is_fast_enough_for_three_comparisons() -> None:
    y, good, noise = synthetic(5000, separation=1.0, seed=8)
    start = time.perf_counter()
    for seed in range(3):
        paired_bootstrap_auc(y, good, noise, n_boot=2000, seed=seed)
    assert time.perf_counter() - start < 10.0


def test_reliability_rows_cover_every_user_and_ece() -> None:
    y = np.array([0, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.55, 0.55, 0.95, 1.0])
    rows = reliability_table(y, p, n_bins=10)
    assert sum(r["count"] for r in rows) == y.size
    assert [r["bin_lower"] for r in rows] == pytest.approx([0.0, 0.1, 0.5, 0.9])
    last = rows[-1]  # 1.0 lands in the top bin, not in an 11th
    assert last["count"] == 2
    assert last["mean_predicted"] == pytest.approx(0.975)
    assert last["observed_rate"] == 1.0
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


def example_report() -> dict[str, Any]:
    y, good, noise = synthetic(400, separation=1.5, seed=12)
    t = best_f1_threshold(y, good)
    return {
        "protocol": "customer-split",
        "cutoff": "1997-09-30",
        "horizon_weeks": 39,
        "n_users": 400,
        "base_rate": float(y.mean()),
        "train_seconds": 1.5,
        "onnx_parity_max_abs_diff": 3e-7,
        "data": {"source": "cdnow", "fingerprint": "abc123", "cleaning": {"rows_read": 69659, "merged": 3}},
        "split": {"train": 240, "validation": 80, "test": 80},
        "models": {"cln": binary_metrics(y, good, t), "bgnbd": binary_metrics(y, noise, 0.5)},
        "bootstrap": {"cln_vs_bgnbd": paired_bootstrap_auc(y, good, noise, n_boot=200)},
        "reliability": {"cln": reliability_table(y, good), "bgnbd": reliability_table(y, noise)},
        "target": {"beats_bgnbd": True, "best_baseline": "bgnbd"},
        "seeds": [0, 1],
        "per_seed_val_auc": [0.77, 0.78],
        "hyperparameters": {"lr": 0.001},
        "ablations": [{"name": "no_summary_channels", "val_auc": 0.75, "test_auc": 0.74, "note": "drop"}],
        "model_version": "cln-test",
        "plots": {"roc": "roc.png", "calibration": "calibration.png"},
    }


def test_write_report_round_trips_and_renders_every_section(tmp_path: Path) -> None:
    report = example_report()
    write_report(report, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())
    assert loaded["models"]["cln"]["roc_auc"] == report["models"]["cln"]["roc_auc"]
    md = (tmp_path / "out" / "report.md").read_text()
    title = md.splitlines()[0]
    assert title.startswith("# ")
    for text in ("customer-split", "1997-09-30", "39 weeks"):
        assert text in title
    cln_row = next(line for line in md.splitlines() if line.startswith("| cln |"))
    assert f"{report['models']['cln']['roc_auc']:.4f}" in cln_row
    assert cln_row.count("|") == len(METRIC_KEYS) + 2
    assert any(line.startswith("| bgnbd |") for line in md.splitlines())
    boot_row = next(line for line in md.splitlines() if line.startswith("| cln_vs_bgnbd |"))
    assert "| yes |" in boot_row  # the CI is above zero
    for text in ("rows_read", "69659", "| train | 240 |", "no_summary_channels", "![roc](roc.png)"):
        assert text in md
    # no temporary files left next to the outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]


def test_render_markdown_skips_missing_sections() -> None:
    md = render_markdown({"protocol": "temporal", "models": {"cln": {"roc_auc": 0.8}}})
    assert "temporal" in md
    assert "| cln | 0.8000 |" in md
    for absent in ("Bootstrap", "Ablations", "Calibration", "Split", "Plots"):
        assert absent.lower() not in md.lower()


def test_write_report_refuses_nan_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        write_report({"models": {"cln": {"roc_auc": float("nan")}}}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_report_accepts_numpy_scalars(tmp_path: Path) -> None:
    write_report({"n_users": np.int64(3), "base_rate": np.float32(0.5), "seeds": np.arange(2)}, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == {
        "n_users": 3,
        "base_rate": 0.5,
        "seeds": [0, 1],
    }
