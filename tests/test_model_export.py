"""The offline pipeline end to end: CLI, report, ONNX contract, parity, leakage, determinism."""

from __future__ import annotations

import csv
import dataclasses
import json
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from model_export.baselines import LightGBMRFM
from model_export.config import PROTOCOL_DEFAULTS, TrainConfig
from model_export.data import Transactions, end_of_day, load_transactions
from model_export.examples import build_examples
from model_export.export import read_metadata
from model_export.files import write_atomic
from model_export.model import CLN, CLNConfig, CorrelationPooling, Ensemble
from model_export.report import Report, render_markdown
from model_export.train import fit, latest_cutoff, load, make_splits, resolve_cutoff, train
from service.artifact import INPUT_NAME, OUTPUT_NAME, ArtifactError, ModelMetadata
from service.features import FeatureSpec, encode_batch
from tests.conftest import TinyModel, run_cli, write_cdnow_slice

METRICS = {"roc_auc", "pr_auc", "log_loss", "brier", "accuracy", "precision", "recall", "f1", "threshold"}


@pytest.mark.slow
def test_cli_writes_model_reports_and_plots(tiny_model_dir: TinyModel) -> None:
    d = tiny_model_dir.dir
    for name in ("model.onnx", "report.json", "report.md", "roc.png", "calibration.png", "scores.csv"):
        assert (d / name).is_file(), name
    assert not list(d.glob("*.data")), "the model must be one self-contained file"
    assert (d / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((d / "report.json").read_text())
    for key in (
        "protocol",
        "cutoff",
        "horizon_weeks",
        "n_users",
        "base_rate",
        "train_seconds",
        "onnx_parity_max_abs_diff",
    ):
        assert key in report, key
    # the CLI's default is the production protocol: out of time, at the latest cutoff of the slice
    latest = latest_cutoff(load_transactions(tiny_model_dir.raw), 13)
    assert (report["protocol"], report["cutoff"], report["horizon_weeks"]) == ("out-of-time", latest, 13)
    assert set(report["models"]) == {"cln", "bgnbd", "logreg_rfm", "lightgbm"}
    for m in report["models"].values():
        assert set(m) >= METRICS
        assert 0.0 <= m["roc_auc"] <= 1.0
    for b in ("bgnbd", "logreg_rfm", "lightgbm"):
        boot = report["bootstrap"][f"cln_vs_{b}"]
        lo, hi = boot["ci95"]
        assert lo <= boot["auc_diff"] <= hi
    assert report["onnx_parity_max_abs_diff"] <= 1e-5
    assert report["data"]["cleaning"]["rows_read"] > 0
    md = (d / "report.md").read_text()
    assert "bgnbd" in md
    assert "lightgbm" in md


@pytest.mark.slow
def test_onnx_file_is_a_contract(tiny_model_dir: TinyModel) -> None:
    proto = onnx.load(str(tiny_model_dir.model))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param, "batch axis must be dynamic"
    meta = read_metadata(tiny_model_dir.model)
    assert [d.dim_value for d in dims[1:]] == list(meta.feature_spec.shape)
    assert {o.domain: o.version for o in proto.opset_import}[""] == meta.opset == 20
    session = ort.InferenceSession(str(tiny_model_dir.model), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 257):
        x = np.zeros((batch, *meta.feature_spec.shape), dtype=np.float32)
        out = session.run(None, {INPUT_NAME: x})[0]
        assert out.shape == (batch,)
        assert np.all((out > 0) & (out < 1))
    assert stat.S_IMODE(tiny_model_dir.model.stat().st_mode) & 0o044 == 0o044, "readable by the serving user"


@pytest.mark.slow
def test_metadata_round_trip(tiny_model_dir: TinyModel) -> None:
    meta = read_metadata(tiny_model_dir.model)
    report = json.loads((tiny_model_dir.dir / "report.json").read_text())
    assert meta.model_version == report["model_version"]
    assert meta.threshold == report["models"]["cln"]["threshold"]
    assert meta.horizon_weeks == 13
    assert meta.horizon_days == 91
    assert meta.feature_spec == FeatureSpec(lookback_bins=39)
    assert meta.data_fingerprint == report["data"]["fingerprint"]
    assert meta.n_seeds == 2
    assert len(meta.normalisation["mean"]) == meta.feature_spec.n_channels
    assert meta.training_metrics["test"]["roc_auc"] == report["models"]["cln"]["roc_auc"]
    assert ModelMetadata.from_props(meta.to_props()) == meta
    assert meta.created_at.endswith("Z")


@pytest.mark.slow
def test_report_json_is_the_typed_report(tiny_model_dir: TinyModel) -> None:
    text = (tiny_model_dir.dir / "report.json").read_text()
    report = Report.from_json(text)
    assert report.to_json() == text
    assert (tiny_model_dir.dir / "report.md").read_text() == render_markdown(report)


def test_metadata_errors_are_clear() -> None:
    with pytest.raises(ArtifactError, match="not a purchase-intent model"):
        ModelMetadata.from_props({})
    with pytest.raises(ArtifactError, match="not valid JSON"):
        ModelMetadata.from_props({"purchase_intent": "{nope"})
    with pytest.raises(ArtifactError, match="missing field"):
        ModelMetadata.from_props({"purchase_intent": json.dumps({"format_version": 1})})
    with pytest.raises(ArtifactError, match="format_version 99"):
        ModelMetadata.from_props({"purchase_intent": json.dumps({"format_version": 99})})


@pytest.mark.slow
def test_pytorch_and_onnxruntime_agree_on_held_out_users(tiny_model_dir: TinyModel) -> None:
    ckpt = torch.load(tiny_model_dir.dir / "checkpoint.pt", weights_only=False)
    n_seeds = ckpt["metadata"]["n_seeds"]
    ensemble = Ensemble([CLN(CLNConfig(**ckpt["cln_config"])) for _ in range(n_seeds)])
    ensemble.load_state_dict(ckpt["state_dict"])
    ensemble.eval()
    x = _test_user_features(tiny_model_dir)
    session = ort.InferenceSession(str(tiny_model_dir.model), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: x})[0]
    with torch.no_grad():
        want = ensemble(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - want)) <= 1e-5


def _test_user_features(tiny: TinyModel) -> np.ndarray:
    """Re-encode the scored test users from the cleaned events, exactly as the service would."""
    scores = pd.read_csv(tiny.scores, dtype={"user_id": str})
    events = pd.read_csv(tiny.events, dtype={"user_id": str})
    events = events[events["user_id"].isin(set(scores["user_id"]))]
    order = {u: i for i, u in enumerate(scores["user_id"])}
    events = events.assign(pos=events["user_id"].map(order)).sort_values("pos", kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(events["pos"], minlength=len(scores)))])
    ts = (pd.to_datetime(events["timestamp"], utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(
        seconds=1
    )
    as_of = int(pd.Timestamp(scores["as_of"].iloc[0]).timestamp())
    spec = read_metadata(tiny.model).feature_spec
    return encode_batch(ts.to_numpy(), events["amount"], events["quantity"], offsets, as_of, spec)


@pytest.mark.slow
def test_offline_scores_are_reproduced_from_raw_events(tiny_model_dir: TinyModel) -> None:
    """What the service will do online: events + as_of -> shared encoder -> onnxruntime."""
    scores = pd.read_csv(tiny_model_dir.scores, dtype={"user_id": str})
    assert len(scores) > 100
    session = ort.InferenceSession(str(tiny_model_dir.model), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: _test_user_features(tiny_model_dir)})[0]
    np.testing.assert_array_equal(got, scores["probability"].to_numpy(np.float32))


def test_no_leakage_across_the_cutoff(tmp_path: Path) -> None:
    raw = write_cdnow_slice(tmp_path / "slice.csv", 400, seed=3)
    tx = load_transactions(raw)
    cutoff = end_of_day("1997-09-30")
    spec = FeatureSpec(lookback_bins=39)
    before = build_examples(tx, cutoff, 39, spec)
    # a huge purchase for everybody one second after the cutoff: features must not move, labels must
    late = pd.DataFrame(
        {"user_id": before.user_ids, "timestamp": cutoff + 1, "amount": 1e6, "quantity": 100.0}
    )
    tx2 = Transactions.from_frame(pd.concat([tx.frame, late], ignore_index=True), tx.report, tx.fingerprint)
    after = build_examples(tx2, cutoff, 39, spec)
    np.testing.assert_array_equal(before.user_ids, after.user_ids)
    np.testing.assert_array_equal(before.encode(), after.encode())
    assert after.y.all()
    assert not before.y.all()
    # customers whose first purchase is after the cutoff are not examples at that cutoff
    early = build_examples(tx, end_of_day("1997-01-15"), 39, spec)
    assert early.y.size < before.y.size


def test_earlier_origins_add_only_training_customers(tmp_path: Path) -> None:
    tx = load_transactions(write_cdnow_slice(tmp_path / "slice.csv", 600, seed=4))
    spec = FeatureSpec(lookback_bins=26)
    for protocol, (cutoff, horizon) in PROTOCOL_DEFAULTS.items():
        cfg = TrainConfig(protocol=protocol, cutoff=cutoff, horizon_weeks=horizon, lookback_bins=26)
        one = make_splits(dataclasses.replace(cfg, origins=1), tx, spec)
        three = make_splits(dataclasses.replace(cfg, origins=3), tx, spec)
        base = one.train.y.size
        # the latest origin is the one-origin training set, unchanged; validation and test too
        np.testing.assert_array_equal(three.train.encode(slice(0, base)), one.train.encode())
        np.testing.assert_array_equal(three.validation.user_ids, one.validation.user_ids)
        np.testing.assert_array_equal(three.test.user_ids, one.test.user_ids)
        assert three.train.y.size > base
        # earlier origins re-encode training customers only (those already customers then)
        earlier = set(three.train.user_ids[base:].tolist())
        assert earlier <= set(one.train.user_ids.tolist())
        assert not earlier & set(one.validation.user_ids.tolist())
        if protocol == "customer-split":  # out of time, the test set is everybody, later
            assert not earlier & set(one.test.user_ids.tolist())
        # each earlier block is exactly those customers encoded and labelled at that earlier cutoff,
        # so its label window ends before the latest origin's: no later period leaks in
        expected = [one.train]
        for k in (1, 2):
            ex = build_examples(
                tx, one.train.as_of - k * cfg.origin_step_weeks * 7 * 86_400, cfg.horizon_weeks, spec
            )
            expected.append(ex.take(np.flatnonzero(np.isin(ex.user_ids, one.train.user_ids))))
        np.testing.assert_array_equal(three.train.encode(), np.concatenate([e.encode() for e in expected]))
        np.testing.assert_array_equal(three.train.y, np.concatenate([e.y for e in expected]))


def test_a_baseline_failing_on_its_thread_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LightGBM fits beside the network on a thread of its own; its error still reaches the caller."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("lightgbm broke")

    monkeypatch.setattr(LightGBMRFM, "fit", broken)
    raw = write_cdnow_slice(tmp_path / "slice.csv", 300, seed=2)
    cfg = TrainConfig(
        data=str(raw), epochs=1, origins=1, conv_channels=4, hidden=8, bootstrap=20, progress=False
    )
    with pytest.raises(RuntimeError, match="lightgbm broke"):
        fit(resolve_cutoff(cfg, load(cfg)), load(cfg))


def test_training_is_deterministic(tmp_path: Path) -> None:
    raw = write_cdnow_slice(tmp_path / "slice.csv", 1500, seed=5)
    cfg = TrainConfig(
        data=str(raw),
        seeds=1,
        epochs=2,
        conv_channels=4,
        hidden=8,
        lookback_bins=26,
        bootstrap=50,
        progress=False,
    )
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    assert a.model_version == b.model_version  # the version embeds a digest of the weights
    assert a.models == b.models


@pytest.mark.slow
def test_out_of_time_protocol(tmp_path: Path) -> None:
    raw = write_cdnow_slice(tmp_path / "slice.csv", 1500, seed=6)
    proc = run_cli(
        "train", "--data", str(raw), "--protocol", "out-of-time", "--cutoff", "1997-12-31",
        "--horizon-weeks", "26", "--epochs", "2", "--conv-channels", "4", "--hidden", "8",
        "--bootstrap", "50", "--no-progress", "--out", str(tmp_path / "oot"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "oot" / "report.json").read_text())
    assert (report["protocol"], report["cutoff"], report["horizon_weeks"]) == (
        "out-of-time",
        "1997-12-31",
        26,
    )
    # trained at cutoff - horizon, evaluated at the cutoff
    assert report["split"]["train_as_of"].startswith("1997-07-02")
    assert report["split"]["test_as_of"].startswith("1997-12-31")
    assert read_metadata(tmp_path / "oot" / "model.onnx").protocol == "out-of-time"


@pytest.mark.slow
def test_customer_split_protocol_stays_available(tmp_path: Path) -> None:
    raw = write_cdnow_slice(tmp_path / "slice.csv", 1500, seed=8)
    proc = run_cli(
        "train", "--data", str(raw), "--protocol", "customer-split", "--epochs", "2", "--conv-channels", "4",
        "--hidden", "8", "--bootstrap", "50", "--no-progress", "--out", str(tmp_path / "cs"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "cs" / "report.json").read_text())
    assert (report["protocol"], report["cutoff"], report["horizon_weeks"]) == (
        "customer-split",
        "1997-09-30",
        39,
    )
    assert report["split"]["test_as_of"].startswith("1997-09-30")


@pytest.mark.slow
def test_malformed_file_fails_with_column_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,timestamp,amount,quantity\n1,1997-01-01,3.5,1\n2,1997-13-45,3.5,1\n")
    proc = run_cli("train", "--data", str(bad), "--out", str(tmp_path / "never"))
    assert proc.returncode == 2
    assert "'timestamp'" in proc.stderr
    assert "line 3" in proc.stderr
    assert not (tmp_path / "never" / "model.onnx").exists()


@pytest.mark.slow
def test_cli_rejects_unknown_channel(tmp_path: Path) -> None:
    proc = run_cli("train", "--channels", "purchases,nope", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown channels" in proc.stderr


def test_correlation_pooling_matches_numpy() -> None:
    torch.manual_seed(0)
    f = torch.randn(3, 5, 20)
    got = CorrelationPooling(5, eps=1e-12)(f).numpy()
    rows, cols = np.triu_indices(5, k=1)
    for b in range(3):
        want = np.corrcoef(f[b].numpy())[rows, cols]
        np.testing.assert_allclose(got[b], want, atol=1e-5)
    flat = CorrelationPooling(5, eps=1e-4)(torch.zeros(2, 5, 20))
    assert torch.isfinite(flat).all()


def test_write_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.onnx"
    write_atomic(b"one", target)
    write_atomic(b"two", target)
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["m.onnx"]


@pytest.mark.slow
def test_scores_file_has_one_row_per_test_user(tiny_model_dir: TinyModel) -> None:
    with tiny_model_dir.scores.open() as fh:
        rows = list(csv.DictReader(fh))
    report = json.loads((tiny_model_dir.dir / "report.json").read_text())
    assert len(rows) == report["split"]["test"]
    assert len({r["user_id"] for r in rows}) == len(rows)
    assert {r["as_of"] for r in rows} == {f"{report['cutoff']}T23:59:59Z"}


@pytest.mark.slow
def test_export_rebuilds_the_model_file_from_the_checkpoint(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    out = tmp_path / "rebuilt.onnx"
    proc = run_cli("export", "--checkpoint", str(tiny_model_dir.dir / "checkpoint.pt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metadata(out) == read_metadata(tiny_model_dir.model)
    # the export is deterministic: the same weights and metadata give the same bytes
    assert out.read_bytes() == tiny_model_dir.model.read_bytes()
    missing = run_cli("export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx"))
    assert missing.returncode == 2
    assert "checkpoint not found" in missing.stderr
    assert not (tmp_path / "x.onnx").exists()
