"""The rolling-origin backtest: cutoffs, per-cutoff fits without leakage, tenure buckets, the report
that ``train`` quotes, and the window-crop identity the training augmentation relies on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from model_export.backtest import MODELS, monthly_cutoffs, pick_cutoffs
from model_export.config import TrainConfig
from model_export.data import columns_from_frame, end_of_day, load_transactions
from model_export.train import fit, latest_cutoff
from service.features import DEFAULT_CHANNELS, FeatureSpec, encode_batch
from tests.conftest import run_cli, write_cdnow_slice

TINY_NET = (
    "--seeds", "1",
    "--origins", "1",
    "--epochs", "2",
    "--conv-channels", "4",
    "--hidden", "8",
    "--bootstrap", "100",
    "--no-progress",
)  # fmt: skip


@pytest.fixture(scope="module")
def slice_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cdnow_slice(tmp_path_factory.mktemp("bt") / "slice.csv", 2000, seed=7)


@pytest.fixture(scope="module")
def backtest_dir(slice_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bt") / "run"
    proc = run_cli("backtest", "--data", str(slice_csv), "--cutoffs", "2", *TINY_NET, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recency" in proc.stdout
    return out


def test_window_crop_is_the_encoding_with_a_shorter_window(slice_csv: Path) -> None:
    """Training crops the time axis to its latest L bins; that is only sound if those bins are exactly
    what the encoder gives with an L-bin window, for customers older than the window too."""
    tx = load_transactions(slice_csv)
    as_of = end_of_day("1998-03-31")  # every CDNOW customer is older than 52 weeks here
    cols = columns_from_frame(tx.frame, as_of)
    channels = (*DEFAULT_CHANNELS, "log_age_bins", "log_spend_total")
    full = encode_batch(
        cols.timestamps, cols.amounts, cols.quantities, cols.offsets, as_of, FeatureSpec(52, 7, channels)
    )
    for bins in (8, 13, 26, 51):
        short = encode_batch(
            cols.timestamps,
            cols.amounts,
            cols.quantities,
            cols.offsets,
            as_of,
            FeatureSpec(bins, 7, channels),
        )
        np.testing.assert_array_equal(full[:, -bins:, :], short)
    # the case matters: many users have no purchase in a 13-bin window but one before it
    purchases = full[:, -13:, channels.index("purchases")].sum(axis=1)
    assert np.mean(purchases == 0) > 0.3


def test_monthly_cutoffs_end_where_the_horizon_allows() -> None:
    tx = load_transactions("cdnow")
    assert latest_cutoff(tx, 13) == "1998-03-31"
    assert latest_cutoff(tx, 26) == "1997-12-30"
    cutoffs = monthly_cutoffs(tx, 13)
    assert cutoffs[-1] == "1998-03-31"
    assert cutoffs[0] == "1997-07-31"  # two horizons after the first purchase (1997-01-01)
    assert len(cutoffs) == 9
    assert cutoffs == sorted(cutoffs)
    three = pick_cutoffs(cutoffs, "3")
    assert three == ["1997-07-31", "1997-11-30", "1998-03-31"]
    assert pick_cutoffs(cutoffs, "1") == ["1998-03-31"]
    assert pick_cutoffs(cutoffs, "1998-02-28,1997-10-31") == ["1997-10-31", "1998-02-28"]
    with pytest.raises(ValueError, match="out of range"):
        pick_cutoffs(cutoffs, "1998-02-30")


@pytest.mark.slow
def test_backtest_writes_every_model_bucket_and_summary(backtest_dir: Path, slice_csv: Path) -> None:
    for name in ("backtest.json", "backtest.md", "backtest_auc.png"):
        assert (backtest_dir / name).is_file(), name
    assert (backtest_dir / "backtest_auc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bt = json.loads((backtest_dir / "backtest.json").read_text())
    assert bt["horizon_weeks"] == 13
    cutoffs = bt["cutoffs"]
    assert len(cutoffs) == 2
    tx = load_transactions(slice_csv)
    frame = tx.frame
    for c in cutoffs:
        assert set(c["models"]) == set(MODELS)
        cutoff = end_of_day(c["cutoff"])
        assert c["fit_as_of"] == pd.Timestamp(cutoff - 13 * 7 * 86_400, unit="s").date().isoformat()
        # recency alone, recomputed here from the cleaned log without the project's encoder
        seen = frame[frame["timestamp"] <= cutoff].groupby("user_id")["timestamp"].max()
        label_rows = frame[(frame["timestamp"] > cutoff) & (frame["timestamp"] <= cutoff + 13 * 7 * 86_400)]
        y = seen.index.isin(label_rows["user_id"]).astype(int)
        recency = -(cutoff // 86_400 - seen.to_numpy() // 86_400)
        assert c["n_test"] == seen.size
        assert c["models"]["recency"]["roc_auc"] == pytest.approx(roc_auc_score(y, recency), abs=1e-12)
        assert c["base_rate"] == pytest.approx(y.mean())
        assert c["models"]["recency"]["brier"] is None
        for name, b in c["bootstrap"].items():
            lo, hi = b["ci95"]
            assert lo <= b["auc_diff"] <= hi, name
        buckets = {b["name"]: b for b in c["tenure"]}
        assert buckets["inside_window"]["n"] + buckets["beyond_window"]["n"] == c["n_test"]
        months = ("under_6_months", "6_to_12_months", "over_12_months")
        assert sum(buckets[m]["n"] for m in months) == c["n_test"]
        beyond = buckets["beyond_window"]
        assert beyond["n"] == round(c["share_beyond_window"] * c["n_test"])
        assert 0.0 < c["validation"]["cln_auc_half_window"] < 1.0
    # the latest cutoff of this slice holds only customers older than the 52-week window
    assert cutoffs[-1]["share_beyond_window"] == 1.0
    s = bt["summary"]
    for m in MODELS:
        assert s["mean_auc"][m] == pytest.approx(np.mean([c["models"][m]["roc_auc"] for c in cutoffs]))
    assert s["best_baseline_by_mean_auc"] in ("bgnbd", "logreg_rfm", "lightgbm")
    assert set(s["targets"]) >= {
        "level_with_best_everywhere",
        "never_below_recency",
        "beats_bgnbd_every_cutoff",
    }
    md = (backtest_dir / "backtest.md").read_text()
    for c in cutoffs:
        assert f"| {c['cutoff']} | {c['n_test']} |" in md
    assert "## By tenure" in md
    assert "## Targets" in md


def test_a_cutoff_sees_nothing_after_it(slice_csv: Path) -> None:
    """Changing every event after the cutoff moves the labels only: the fit and its scores are equal."""
    tx = load_transactions(slice_csv)
    cfg = TrainConfig(
        data=str(slice_csv), protocol="out-of-time", cutoff="1998-01-31", horizon_weeks=13, seeds=1,
        origins=2, epochs=2, conv_channels=4, hidden=8, progress=False,
    )  # fmt: skip
    cutoff = end_of_day(cfg.cutoff)
    later = tx.timestamps > cutoff
    changed = dataclasses.replace(
        tx,
        amounts=np.where(later, tx.amounts * 10.0 + 1.0, tx.amounts),
        quantities=np.where(later, tx.quantities + 5.0, tx.quantities),
    )
    a, b = fit(cfg, tx), fit(cfg, changed)
    for model in a.scores:
        np.testing.assert_array_equal(a.scores[model]["test"], b.scores[model]["test"])
    np.testing.assert_array_equal(a.splits.test.y, b.splits.test.y)


@pytest.mark.slow
def test_train_report_quotes_the_backtest(backtest_dir: Path, slice_csv: Path, tmp_path: Path) -> None:
    args = ("train", "--data", str(slice_csv), *TINY_NET, "--backtest", str(backtest_dir / "backtest.json"))
    same = run_cli(*args, "--out", str(tmp_path / "same"))
    assert same.returncode == 0, same.stderr[-3000:]
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    assert report["protocol"] == "out-of-time"
    assert report["cutoff"] == latest_cutoff(load_transactions(slice_csv), 13)
    estimate = report["backtest"]
    assert estimate["same_data_and_settings"] is True, estimate["differences"]
    bt = json.loads((backtest_dir / "backtest.json").read_text())
    assert [c["cln_auc"] for c in estimate["cutoffs"]] == [
        c["models"]["cln"]["roc_auc"] for c in bt["cutoffs"]
    ]
    md = (tmp_path / "same" / "report.md").read_text()
    assert "## Expected performance: rolling-origin backtest" in md
    assert "same data with the same settings" in md

    other = run_cli(*args, "--hidden", "16", "--out", str(tmp_path / "other"))
    assert other.returncode == 0, other.stderr[-3000:]
    estimate = json.loads((tmp_path / "other" / "report.json").read_text())["backtest"]
    assert estimate["same_data_and_settings"] is False
    assert estimate["differences"] == ["hidden"]
