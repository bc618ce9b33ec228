"""``train(cfg, out_dir)``: data -> splits -> seed members -> baselines -> ONNX file -> report.

``fit`` is the part ``backtest`` shares: splits, seed members (``loop``), baselines, scores. Out of
time (the default, what production does) the model is fitted at ``cutoff - horizon`` with labels up
to the cutoff and judged on everybody known at the cutoff; the customer split holds test customers
out at one date. Test customers never reach fitting, early stopping or thresholds (docs/model.md).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split

from model_export import baselines, metrics
from model_export.baselines import BASELINES
from model_export.config import LATEST, TrainConfig
from model_export.data import Transactions, end_of_day, load_transactions
from model_export.examples import SECONDS_PER_WEEK, Examples, build_examples, normalisation, stack
from model_export.export import PARITY_ROWS, export_ensemble, run_onnx, save_checkpoint, with_metadata
from model_export.files import write_atomic
from model_export.loop import MemberResult, predict, train_member
from model_export.metrics import AucDiff, BinaryMetrics
from model_export.model import CLNConfig, Ensemble, n_parameters
from model_export.plots import plot_calibration, plot_roc
from model_export.report import BacktestQuote, DataSummary, Report, SeedRun, SplitSizes, Target, write_report
from service.artifact import ModelMetadata
from service.features import FeatureSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    train: Examples
    validation: Examples
    test: Examples


def _stratified(
    y: NDArray[np.int64], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    idx = np.arange(y.size)
    rest, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    return np.sort(rest), np.sort(held)


def _with_earlier_origins(cfg: TrainConfig, tx: Transactions, spec: FeatureSpec, train: Examples) -> Examples:
    """Add the same training customers at earlier cutoffs (``--origins``, every ``--origin-step-weeks``).

    Each earlier origin's label window ends before the latest one's, so nothing from a later
    period leaks in; validation and test customers never appear in any origin.
    """
    parts = [train]
    for k in range(1, cfg.origins):
        ex = build_examples(
            tx, train.as_of - k * cfg.origin_step_weeks * SECONDS_PER_WEEK, cfg.horizon_weeks, spec
        )
        parts.append(ex.take(np.flatnonzero(np.isin(ex.users, train.users))))
    return stack(parts) if len(parts) > 1 else train


def make_splits(cfg: TrainConfig, tx: Transactions, spec: FeatureSpec) -> Splits:
    cutoff = end_of_day(resolve_cutoff(cfg, tx).cutoff)
    if cfg.protocol == "customer-split":
        ex = build_examples(tx, cutoff, cfg.horizon_weeks, spec)
        rest, test = _stratified(ex.y, cfg.test_fraction, cfg.seed)
        val_share = cfg.validation_fraction / (1.0 - cfg.test_fraction)
        tr, va = _stratified(ex.y[rest], val_share, cfg.seed + 1)
        train = _with_earlier_origins(cfg, tx, spec, ex.take(rest[tr]))
        return Splits(train, ex.take(rest[va]), ex.take(test))
    t0 = cutoff - cfg.horizon_weeks * SECONDS_PER_WEEK
    fit = build_examples(tx, t0, cfg.horizon_weeks, spec)
    tr, va = _stratified(fit.y, cfg.validation_fraction, cfg.seed)
    scored = build_examples(tx, cutoff, cfg.horizon_weeks, spec)
    return Splits(_with_earlier_origins(cfg, tx, spec, fit.take(tr)), fit.take(va), scored)


def _subsample(tx: Transactions, max_users: int, seed: int) -> Transactions:
    if tx.n_users <= max_users:
        return tx
    chosen = np.random.default_rng(seed).choice(tx.n_users, size=max_users, replace=False)
    return tx.take(np.sort(chosen))


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


Scores = dict[str, dict[str, NDArray[np.float64]]]  # model -> "validation" / "test" -> probabilities


def _in_background(work: Callable[[], Scores]) -> Future[Scores]:
    """``work`` on a daemon thread: a run stopped by an error or Ctrl-C exits without waiting for it."""
    future: Future[Scores] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to whoever waits for the result
            future.set_exception(exc)

    threading.Thread(target=run, name="lightgbm", daemon=True).start()
    return future


def _baseline_scores(cfg: TrainConfig, splits: Splits) -> tuple[Scores, Future[Scores]]:
    """Validation and test probabilities of every baseline, fitted on the training customers: BG/NBD
    and the regression's now, LightGBM's to come.

    LightGBM, by far the slowest, fits on a thread of its own: one OpenMP thread in C++ that mostly
    runs without the GIL, so it takes the core the network's single torch thread leaves free. BG/NBD
    and the regression fit here first: lifetimes and sklearn swap the process-wide warning filters,
    which two threads must not do at once.
    """
    rfm = {
        name: baselines.rfm_from_summary(getattr(splits, name).summary)
        for name in ("train", "validation", "test")
    }
    mat = {name: baselines.rfm_matrix(r) for name, r in rfm.items()}
    out: Scores = {}
    bg = baselines.BGNBD().fit(rfm["train"])
    out["bgnbd"] = {s: bg.predict_proba(rfm[s], cfg.horizon_weeks) for s in ("validation", "test")}
    lr = baselines.LogRegRFM().fit(mat["train"], splits.train.y)
    out["logreg_rfm"] = {s: lr.predict_proba(mat[s]) for s in ("validation", "test")}

    def lightgbm() -> Scores:
        gbm = baselines.LightGBMRFM(seed=cfg.seed).fit(
            mat["train"], splits.train.y, mat["validation"], splits.validation.y
        )
        # scoring, unlike fitting, has no barriers to spin at: more threads cost little even while
        # the network still trains, and at scale it has finished by now
        cores = len(os.sched_getaffinity(0))
        return {"lightgbm": {s: gbm.predict_proba(mat[s], threads=cores) for s in ("validation", "test")}}

    return out, _in_background(lightgbm)


@dataclass(frozen=True)
class Fitted:
    """One protocol run up to the scores: what ``train`` exports and ``backtest`` evaluates."""

    splits: Splits
    net_cfg: CLNConfig
    mean: NDArray[np.float32]
    std: NDArray[np.float32]
    members: list[MemberResult]
    ensemble: Ensemble
    scores: Scores
    # model -> its test AUC on each of cfg.bootstrap resamples of the test customers (seed cfg.seed):
    # the same resamples for every model, so differences are paired (metrics.bootstrap_aucs)
    test_replicates: dict[str, NDArray[np.float64]]
    train_seconds: float


def feature_spec(cfg: TrainConfig) -> FeatureSpec:
    return FeatureSpec(lookback_bins=cfg.lookback_bins, bin_days=cfg.bin_days, channels=cfg.channels)


def latest_cutoff(tx: Transactions, horizon_weeks: int) -> str:
    """The last cutoff (YYYY-MM-DD) whose whole label window lies inside the data."""
    last_day = tx.last_timestamp // 86_400
    return datetime.fromtimestamp((last_day - 7 * horizon_weeks) * 86_400, UTC).date().isoformat()


def resolve_cutoff(cfg: TrainConfig, tx: Transactions) -> TrainConfig:
    """``cfg`` with a ``latest`` cutoff replaced by its date in this log."""
    return replace(cfg, cutoff=latest_cutoff(tx, cfg.horizon_weeks)) if cfg.cutoff == LATEST else cfg


def load(cfg: TrainConfig) -> Transactions:
    """The cleaned log of ``cfg.data`` (a seeded sample of customers with ``max_users``)."""
    tx = load_transactions(cfg.data, cfg.columns or None)
    return _subsample(tx, cfg.max_users, cfg.seed) if cfg.max_users is not None else tx


def fit(cfg: TrainConfig, tx: Transactions) -> Fitted:
    """Splits, the seed members and the baselines, scored on validation and test customers."""
    spec = feature_spec(cfg)
    splits = make_splits(cfg, tx, spec)
    for name in ("train", "validation", "test"):
        ex: Examples = getattr(splits, name)
        if ex.y.size == 0 or ex.y.min() == ex.y.max():
            raise ValueError(
                f"the {name} split has {ex.y.size} customers and one class only: cannot train or evaluate"
            )

    net_cfg = CLNConfig(
        n_channels=spec.n_channels,
        lookback_bins=spec.lookback_bins,
        conv_channels=cfg.conv_channels,
        conv_layers=cfg.conv_layers,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
        pool_last=cfg.pool_last,
        wide=cfg.wide,
    )
    y_test = splits.test.y
    scores, lightgbm = _baseline_scores(cfg, splits)
    mean, std = normalisation(splits.train)
    started = time.perf_counter()
    tr, va = splits.train, splits.validation
    members = [train_member(cfg, net_cfg, tr, va, mean, std, cfg.seed + k) for k in range(cfg.seeds)]
    train_seconds = time.perf_counter() - started
    ensemble = Ensemble([m.model for m in members]).eval()
    scores = {"cln": {s: predict(ensemble, getattr(splits, s)) for s in ("validation", "test")}} | scores
    # the bootstrap of the models scored so far, while LightGBM may still be fitting
    test = {name: s["test"] for name, s in scores.items()}
    replicates = metrics.bootstrap_aucs(y_test, test, cfg.bootstrap, cfg.seed)
    scores |= lightgbm.result()
    replicates |= metrics.bootstrap_aucs(
        y_test, {"lightgbm": scores["lightgbm"]["test"]}, cfg.bootstrap, cfg.seed
    )
    return Fitted(splits, net_cfg, mean, std, members, ensemble, scores, replicates, train_seconds)


def train(cfg: TrainConfig, out_dir: Path, backtest: Path | None = None) -> Report:
    """Run the whole offline pipeline and write ``model.onnx``, ``report.{json,md}``, plots, scores.

    ``backtest``: a ``backtest.json`` whose figures the report quotes as the estimate of how this
    model will do, with whether it was run on the same data and settings.
    """
    torch.set_num_threads(cfg.torch_threads)
    torch.use_deterministic_algorithms(True)
    out_dir.mkdir(parents=True, exist_ok=True)

    tx = load(cfg)
    cfg = resolve_cutoff(cfg, tx)
    _warn_if_censored(cfg, tx)
    fitted = fit(cfg, tx)
    splits = fitted.splits
    models, boot = _test_metrics(cfg, fitted)

    proto, parity_diff = export_ensemble(
        fitted.ensemble, splits.test.slices(), cfg.opset, expected=fitted.scores["cln"]["test"]
    )
    hyper = fitted.net_cfg.to_dict() | {
        k: v for k, v in cfg.to_dict().items() if k not in ("data", "columns", "progress")
    }
    metadata = _metadata(cfg, tx, fitted, models, parity_diff, hyper)
    final = with_metadata(proto, metadata)
    write_atomic(final.SerializeToString(), out_dir / "model.onnx")
    _write_scores(out_dir / "scores.csv", splits.test, run_onnx(final, splits.test.slices()))
    held_out = splits.test.encode(slice(0, PARITY_ROWS))
    save_checkpoint(out_dir / "checkpoint.pt", fitted.ensemble, fitted.net_cfg, metadata, hyper, held_out)

    plots = {"roc": "roc.png", "calibration": "calibration.png"}
    y_te, p_te = splits.test.y, {k: v["test"] for k, v in fitted.scores.items()}
    plot_roc(y_te, p_te, out_dir / plots["roc"])
    plot_calibration(y_te, p_te, out_dir / plots["calibration"])

    n_train = int(np.unique(splits.train.users).size)
    report = Report(
        protocol=cfg.protocol,
        cutoff=cfg.cutoff,
        horizon_weeks=cfg.horizon_weeks,
        # out of time, the test customers are everybody known at the cutoff
        n_users=n_train + int(splits.validation.y.size + y_te.size)
        if cfg.protocol == "customer-split"
        else int(y_te.size),
        base_rate=float(y_te.mean()),
        train_seconds=round(fitted.train_seconds, 2),
        onnx_parity_max_abs_diff=parity_diff,
        model_version=metadata.model_version,
        created_at=metadata.created_at,
        n_parameters=n_parameters(fitted.ensemble),
        data=DataSummary(source=cfg.data, fingerprint=tx.fingerprint, cleaning=tx.report),
        split=SplitSizes(
            train=n_train,
            train_examples=int(splits.train.y.size),
            origins=cfg.origins,
            validation=int(splits.validation.y.size),
            test=int(y_te.size),
            train_as_of=datetime.fromtimestamp(splits.train.as_of, UTC).isoformat(),
            test_as_of=datetime.fromtimestamp(splits.test.as_of, UTC).isoformat(),
        ),
        models=models,
        bootstrap=boot,
        reliability={k: metrics.reliability_table(y_te, p) for k, p in p_te.items()},
        target=Target.of(models, boot),
        hyperparameters=hyper,
        backtest=BacktestQuote.read(backtest, cfg.model_settings(), tx.fingerprint)
        if backtest is not None
        else None,
        feature_spec=feature_spec(cfg),
        per_seed=[SeedRun(m.seed, m.epochs_run, m.best_epoch, m.val_loss, m.val_auc) for m in fitted.members],
        plots=plots,
    )
    write_report(report, out_dir)
    return report


def _warn_if_censored(cfg: TrainConfig, tx: Transactions) -> None:
    horizon_end = end_of_day(cfg.cutoff) + cfg.horizon_weeks * SECONDS_PER_WEEK
    if horizon_end > tx.last_timestamp + 86_400:
        log.warning(
            "the label window ends %s, after the last event in the data (%s): late labels are censored",
            datetime.fromtimestamp(horizon_end, UTC).date(),
            tx.report.last_timestamp,
        )


def _test_metrics(cfg: TrainConfig, fitted: Fitted) -> tuple[dict[str, BinaryMetrics], dict[str, AucDiff]]:
    """Every model on the test customers at its F1-best threshold on validation, and the network's
    paired bootstrap against each baseline."""
    y_va, y_te = fitted.splits.validation.y, fitted.splits.test.y
    models = {
        name: metrics.binary_metrics(y_te, s["test"], metrics.best_f1_threshold(y_va, s["validation"]))
        for name, s in fitted.scores.items()
    }
    reps = fitted.test_replicates
    boot = {
        f"cln_vs_{b}": metrics.summarise_diffs(
            models["cln"].roc_auc - models[b].roc_auc, reps["cln"] - reps[b]
        )
        for b in BASELINES
    }
    return models, boot


def _metadata(
    cfg: TrainConfig,
    tx: Transactions,
    fitted: Fitted,
    models: dict[str, BinaryMetrics],
    parity_diff: float,
    hyper: dict[str, Any],
) -> ModelMetadata:
    """What the model file says about itself; the version names the weights by their digest."""
    splits = fitted.splits
    digest = _weights_digest(fitted.ensemble)
    return ModelMetadata(
        model_version=f"cln-{cfg.protocol}-{cfg.cutoff.replace('-', '')}-{digest[:10]}",
        created_at=datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        feature_spec=feature_spec(cfg),
        threshold=models["cln"].threshold,
        horizon_weeks=cfg.horizon_weeks,
        protocol=cfg.protocol,
        cutoff=cfg.cutoff,
        data_fingerprint=tx.fingerprint,
        normalisation={"mean": fitted.mean.tolist(), "std": fitted.std.tolist()},
        training_metrics={
            "test": asdict(models["cln"]),
            "baselines_test_auc": {b: models[b].roc_auc for b in BASELINES},
            "n_train": int(splits.train.y.size),
            "n_validation": int(splits.validation.y.size),
            "n_test": int(splits.test.y.size),
            "onnx_parity_max_abs_diff": parity_diff,
        },
        hyperparameters=hyper,
        opset=cfg.opset,
        n_seeds=cfg.seeds,
        score_reference=metrics.ScoreReference.of(fitted.scores["cln"]["test"]),
    )


def _write_scores(path: Path, ex: Examples, probs: NDArray[np.float32]) -> None:
    """Offline scores of the test customers: the service must reproduce them from the same events."""
    as_of = datetime.fromtimestamp(ex.as_of, UTC).isoformat().replace("+00:00", "Z")
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "as_of", "probability", "label"])
        for uid, prob, label in zip(ex.user_ids, probs, ex.y, strict=True):
            writer.writerow([uid, as_of, repr(float(prob)), int(label)])
