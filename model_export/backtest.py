"""``backtest(cfg, cutoffs, out_dir)``: the out-of-time protocol at a series of evaluation cutoffs.

Each cutoff is a full run of :func:`model_export.train.fit`: fitted only on data up to the cutoff
(features at ``cutoff - horizon``, labels up to the cutoff), then every customer known at the cutoff
is scored and judged on the next ``horizon`` weeks. The network is compared with every baseline and
with recency alone (no training: the more recent the last purchase, the higher the score), overall
and by tenure, because a model that is fine on young customers can fail on those whose history
began before its window.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from model_export import metrics
from model_export.baselines import BASELINES
from model_export.config import TrainConfig
from model_export.data import Transactions, end_of_day
from model_export.examples import SECONDS_PER_WEEK
from model_export.files import write_atomic
from model_export.train import Fitted, fit, latest_cutoff, load

log = logging.getLogger(__name__)

RECENCY = "recency"
MODELS = ("cln", *BASELINES, RECENCY)
#: A bucket needs this many customers of each class before its metrics are reported.
MIN_CLASS = 20
#: A month in days, for the tenure buckets (the window buckets follow the feature spec instead).
MONTH_DAYS = 365.25 / 12


@dataclass(frozen=True)
class Scores:
    """One model's metrics on one set of customers; ``brier`` is None for recency (not a probability)."""

    roc_auc: float
    pr_auc: float
    brier: float | None


@dataclass(frozen=True)
class Bucket:
    name: str
    n: int
    positives: int
    models: dict[str, Scores]  # empty when a class has fewer than MIN_CLASS customers
    vs_best: dict[str, Any] | None  # bootstrap of cln - the bucket's best baseline by AUC; None if empty


@dataclass(frozen=True)
class CutoffResult:
    cutoff: str
    fit_as_of: str
    n_test: int
    base_rate: float
    share_beyond_window: float
    models: dict[str, Scores]
    bootstrap: dict[str, dict[str, Any]]  # "cln_vs_<model>" -> metrics.summarise_diffs as a dict
    tenure: list[Bucket]
    validation: dict[str, float]  # selection signals on validation customers only (never the test)
    train_seconds: float
    seconds: float


@dataclass(frozen=True)
class Summary:
    mean_auc: dict[str, float]
    mean_brier: dict[str, float]
    best_baseline_by_mean_auc: str
    mean_diff_vs_best: dict[str, Any]  # bootstrap of the cutoff-averaged AUC difference
    mean_diff_vs: dict[str, dict[str, Any]]
    worst_auc_gap: dict[str, Any]  # min over cutoffs and buckets of cln - best baseline
    worst_brier_gap: dict[str, Any]  # max over cutoffs and buckets of cln - best baseline
    missed_level: list[dict[str, Any]]  # the cells that miss the "level" rule, with the AUC gap's CI
    targets: dict[str, bool]


@dataclass(frozen=True)
class Backtest:
    created_at: str
    data: dict[str, Any]
    horizon_weeks: int
    lookback_days: int
    seeds: int
    hyperparameters: dict[str, Any]
    seconds: float
    cutoffs: list[CutoffResult]
    summary: Summary
    rules: dict[str, str] = field(
        default_factory=lambda: {
            "level": "per cutoff and tenure bucket: cln AUC >= best baseline - 0.002 and "
            "Brier <= best + 0.002",
            "recency": "per cutoff and tenure bucket: cln AUC >= recency alone",
            "bgnbd": "per cutoff: paired bootstrap 95% CI of cln - BG/NBD above 0",
            "mean": "mean cln AUC over cutoffs >= the mean of the best baseline (by mean AUC)",
        }
    )


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def monthly_cutoffs(tx: Transactions, horizon_weeks: int, step_months: int = 1) -> list[str]:
    """Cutoffs every ``step_months`` back from :func:`latest_cutoff`, oldest first.

    The earliest leaves one horizon of history before its fit date (``cutoff - horizon``), so the
    first model has customers with some past to learn from.
    """
    last = pd.Timestamp(latest_cutoff(tx, horizon_weeks))
    first_day = tx.first_timestamp // 86_400
    earliest = pd.Timestamp(_day((first_day + 2 * 7 * horizon_weeks) * 86_400))
    out: list[str] = []
    k = 0
    while (c := last - pd.DateOffset(months=k * step_months)) >= earliest:
        out.append(c.date().isoformat())
        k += 1
    if not out:
        raise ValueError(f"the data is too short for a {horizon_weeks}-week horizon backtest")
    return out[::-1]


def pick_cutoffs(all_cutoffs: list[str], wanted: str | None) -> list[str]:
    """``wanted``: None (all), a count N (N spread over the series, always with the latest) or dates."""
    if wanted is None:
        return all_cutoffs
    if wanted.strip().isdigit():
        n = int(wanted)
        if n < 1:
            raise ValueError("--cutoffs needs at least 1")
        if n >= len(all_cutoffs):
            return all_cutoffs
        idx = np.unique(np.round(np.linspace(len(all_cutoffs) - 1, 0, n)).astype(int))
        return [all_cutoffs[i] for i in sorted(idx)]
    dates = [d.strip() for d in wanted.split(",") if d.strip()]
    for d in dates:
        datetime.strptime(d, "%Y-%m-%d")  # raises ValueError naming the bad date
    return sorted(dates)


def _scores(y: NDArray[np.int64], p: NDArray[np.float64], probability: bool) -> Scores:
    return Scores(
        roc_auc=metrics.roc_auc(y, p),
        pr_auc=float(average_precision_score(y, p)),
        brier=float(np.mean((p - y) ** 2)) if probability else None,
    )


def _test_scores(fitted: Fitted) -> dict[str, NDArray[np.float64]]:
    s = fitted.splits.test.summary
    # recency alone: the newer the last purchase, the higher the score
    recency = -s.last_age_days.astype(np.float64)
    return {name: fitted.scores[name]["test"] for name in ("cln", *BASELINES)} | {RECENCY: recency}


def _buckets(first_age_days: NDArray[np.int64], window_days: int) -> dict[str, NDArray[np.bool_]]:
    age = first_age_days.astype(np.float64)
    return {
        "inside_window": age < window_days,
        "beyond_window": age >= window_days,
        "under_6_months": age < 6 * MONTH_DAYS,
        "6_to_12_months": (age >= 6 * MONTH_DAYS) & (age < 12 * MONTH_DAYS),
        "over_12_months": age >= 12 * MONTH_DAYS,
    }


def _validation_signals(fitted: Fitted) -> dict[str, float]:
    """Network and baselines on the validation customers at the fit date, plus the network on the
    same customers with its window cropped to half: every one of them then has history before the
    window, the case the test windows hold at late cutoffs and training never does."""
    va = fitted.splits.validation
    out = {
        f"{name}_auc": metrics.roc_auc(va.y, fitted.scores[name]["validation"])
        for name in ("cln", *BASELINES)
    }
    out["cln_log_loss"] = metrics.binary_metrics(va.y, fitted.scores["cln"]["validation"], 0.5).log_loss
    half = va.spec.lookback_bins // 2
    with torch.no_grad():
        cropped = np.concatenate(
            [
                fitted.ensemble(torch.from_numpy(np.ascontiguousarray(x[:, -half:, :]))).double().numpy()
                for x in va.slices()
            ]
        )
    out["cln_auc_half_window"] = metrics.roc_auc(va.y, cropped)
    out["cln_log_loss_half_window"] = metrics.binary_metrics(va.y, cropped, 0.5).log_loss
    return out


def _bucket(
    name: str, y: NDArray[np.int64], scores: dict[str, NDArray[np.float64]], n_boot: int, seed: int
) -> Bucket:
    positives = int(y.sum())
    if positives < MIN_CLASS or y.size - positives < MIN_CLASS:
        return Bucket(name, int(y.size), positives, {}, None)
    models = {m: _scores(y, p, m != RECENCY) for m, p in scores.items()}
    best = max(BASELINES, key=lambda b: models[b].roc_auc)
    diffs = metrics.bootstrap_auc_diffs(y, scores["cln"], scores[best], n_boot, seed)
    vs_best = asdict(metrics.summarise_diffs(models["cln"].roc_auc - models[best].roc_auc, diffs))
    return Bucket(name, int(y.size), positives, models, vs_best | {"baseline": best})


def run_cutoff(
    cfg: TrainConfig, tx: Transactions, cutoff: str, n_boot: int
) -> tuple[CutoffResult, dict[str, NDArray[np.float64]]]:
    """One cutoff: fit, score, compare. Also returns the bootstrap replicates of cln - each model."""
    started = time.perf_counter()
    run_cfg = replace(cfg, protocol="out-of-time", cutoff=cutoff, progress=False, bootstrap=n_boot)
    fitted = fit(run_cfg, tx)
    test = fitted.splits.test
    y = test.y
    scores = _test_scores(fitted)
    models = {name: _scores(y, p, name != RECENCY) for name, p in scores.items()}
    aucs = fitted.test_replicates | metrics.bootstrap_aucs(y, {RECENCY: scores[RECENCY]}, n_boot, cfg.seed)
    replicates = {name: aucs["cln"] - aucs[name] for name in MODELS[1:]}
    boot = {
        f"cln_vs_{name}": asdict(
            metrics.summarise_diffs(models["cln"].roc_auc - models[name].roc_auc, replicates[name])
        )
        for name in MODELS[1:]
    }
    window_days = cfg.lookback_bins * cfg.bin_days
    buckets = [
        _bucket(name, y[mask], {m: p[mask] for m, p in scores.items()}, n_boot, cfg.seed)
        for name, mask in _buckets(test.summary.first_age_days, window_days).items()
    ]
    result = CutoffResult(
        cutoff=cutoff,
        fit_as_of=_day(end_of_day(cutoff) - cfg.horizon_weeks * SECONDS_PER_WEEK),
        n_test=int(y.size),
        base_rate=float(y.mean()),
        share_beyond_window=float(np.mean(test.summary.first_age_days >= window_days)),
        models=models,
        bootstrap=boot,
        tenure=buckets,
        validation=_validation_signals(fitted),
        train_seconds=round(fitted.train_seconds, 1),
        seconds=round(time.perf_counter() - started, 1),
    )
    return result, replicates


def _cells(result: CutoffResult) -> list[tuple[str, dict[str, Scores], dict[str, Any]]]:
    """Every cell the per-cell targets are checked on: the cutoff and its buckets, each with its
    models' scores and the bootstrap of cln against its best baseline."""
    best = max(BASELINES, key=lambda b: result.models[b].roc_auc)
    cells = [(result.cutoff, result.models, result.bootstrap[f"cln_vs_{best}"] | {"baseline": best})]
    cells += [(f"{result.cutoff} {b.name}", b.models, b.vs_best) for b in result.tenure if b.vs_best]
    return cells


def summarise(results: list[CutoffResult], replicates: list[dict[str, NDArray[np.float64]]]) -> Summary:
    mean_auc = {m: float(np.mean([r.models[m].roc_auc for r in results])) for m in MODELS}
    mean_brier = {
        m: float(np.mean([b for r in results if (b := r.models[m].brier) is not None])) for m in MODELS[:-1]
    }
    best = max(BASELINES, key=lambda b: mean_auc[b])
    mean_diff_vs: dict[str, dict[str, Any]] = {}
    for name in MODELS[1:]:
        stacked = np.vstack([rep[name] for rep in replicates])  # [cutoffs, n_boot]
        point = mean_auc["cln"] - mean_auc[name]
        mean_diff_vs[name] = asdict(metrics.summarise_diffs(point, np.mean(stacked, axis=0)))

    worst_auc: dict[str, Any] = {"gap": math.inf, "where": ""}
    worst_brier: dict[str, Any] = {"gap": -math.inf, "where": ""}
    missed: list[dict[str, Any]] = []
    level = below_recency = True
    for r in results:
        for where, ms, vs_best in _cells(r):
            best_auc = max(ms[b].roc_auc for b in BASELINES)
            best_brier = min(ms[b].brier or math.inf for b in BASELINES)
            gap = ms["cln"].roc_auc - best_auc
            bgap = (ms["cln"].brier or math.inf) - best_brier
            if gap < worst_auc["gap"]:
                worst_auc = {"gap": gap, "where": where, "ci95": vs_best["ci95"]}
            if bgap > worst_brier["gap"]:
                worst_brier = {"gap": bgap, "where": where}
            if gap < -0.002 or bgap > 0.002:
                level = False
                n = next((b.n for b in r.tenure if where.endswith(b.name)), r.n_test)
                missed.append(
                    {
                        "where": where,
                        "customers": n,
                        "auc_gap": gap,
                        "ci95": vs_best["ci95"],
                        "brier_gap": bgap,
                    }
                )
            if ms["cln"].roc_auc < ms[RECENCY].roc_auc:
                below_recency = False
    targets = {
        "level_with_best_everywhere": level,
        "never_below_recency": below_recency,
        "beats_bgnbd_every_cutoff": all(r.bootstrap["cln_vs_bgnbd"]["ci95"][0] > 0 for r in results),
        "mean_auc_at_least_best": mean_auc["cln"] >= mean_auc[best],
        "mean_auc_ahead_ci_above_0": mean_diff_vs[best]["ci95"][0] > 0,
    }
    return Summary(
        mean_auc=mean_auc,
        mean_brier=mean_brier,
        best_baseline_by_mean_auc=best,
        mean_diff_vs_best=mean_diff_vs[best],
        mean_diff_vs=mean_diff_vs,
        worst_auc_gap=worst_auc,
        worst_brier_gap=worst_brier,
        missed_level=missed,
        targets=targets,
    )


def backtest(cfg: TrainConfig, out_dir: Path, cutoffs: str | None = None, n_boot: int = 1000) -> Backtest:
    """Run every cutoff and write ``backtest.json``, ``backtest.md`` and ``backtest_auc.png``."""
    torch.set_num_threads(cfg.torch_threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    tx = load(cfg)
    chosen = pick_cutoffs(monthly_cutoffs(tx, cfg.horizon_weeks), cutoffs)
    last_allowed = latest_cutoff(tx, cfg.horizon_weeks)
    late = [c for c in chosen if c > last_allowed]
    if late:
        raise ValueError(
            f"cutoffs {late} leave no full {cfg.horizon_weeks}-week label window (latest {last_allowed})"
        )
    results: list[CutoffResult] = []
    replicates: list[dict[str, NDArray[np.float64]]] = []
    bar = tqdm(chosen, desc="backtest", unit="cutoff", disable=not cfg.progress)
    for cutoff in bar:
        bar.set_postfix(cutoff=cutoff)
        result, reps = run_cutoff(cfg, tx, cutoff, n_boot)
        results.append(result)
        replicates.append(reps)
        log.info(
            "cutoff %s: cln %.4f, best baseline %.4f, recency %.4f (%.0f s)",
            cutoff,
            result.models["cln"].roc_auc,
            max(result.models[b].roc_auc for b in BASELINES),
            result.models[RECENCY].roc_auc,
            result.seconds,
        )
    bar.close()
    hyper = cfg.model_settings()
    out = Backtest(
        created_at=datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        data={"source": cfg.data, "fingerprint": tx.fingerprint, "users": tx.report.users},
        horizon_weeks=cfg.horizon_weeks,
        lookback_days=cfg.lookback_bins * cfg.bin_days,
        seeds=cfg.seeds,
        hyperparameters=hyper,
        seconds=round(time.perf_counter() - started, 1),
        cutoffs=results,
        summary=summarise(results, replicates),
    )
    write(out, out_dir)
    return out


def write(result: Backtest, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(result), indent=2, allow_nan=False)
    markdown = render_markdown(result)
    plot_auc(result, out_dir / "backtest_auc.png")
    write_atomic(text.encode(), out_dir / "backtest.json")
    write_atomic(markdown.encode(), out_dir / "backtest.md")


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def _ci(b: dict[str, Any]) -> str:
    lo, hi = b["ci95"]
    return f"{_signed(b['auc_diff'])} [{_signed(lo)}, {_signed(hi)}]"


def render_markdown(r: Backtest) -> str:
    s = r.summary
    names = " | ".join(MODELS)
    lines = [
        f"# Rolling-origin backtest: {len(r.cutoffs)} cutoffs, horizon {r.horizon_weeks} weeks",
        "",
        f"- data: {r.data['source']} ({r.data['users']} customers, fingerprint {r.data['fingerprint'][:12]})",
        f"- network: {r.seeds} seed(s), lookback {r.lookback_days} days; run took {r.seconds:.0f} s",
        "- each cutoff is fitted on data up to the cutoff only (features at cutoff - horizon) and "
        "tested on the next horizon; 'recency' ranks by days since the last purchase (no training)",
        "",
        "## ROC-AUC by cutoff",
        "",
        f"| cutoff | customers | beyond window | {names} | cln - best baseline [95% CI] |",
        "|" + " --- |" * (4 + len(MODELS)),
    ]
    for c in r.cutoffs:
        best = max(BASELINES, key=lambda b: c.models[b].roc_auc)
        cells = " | ".join(_f(c.models[m].roc_auc) for m in MODELS)
        lines.append(
            f"| {c.cutoff} | {c.n_test} | {c.share_beyond_window:.0%} | {cells} | "
            f"{_ci(c.bootstrap[f'cln_vs_{best}'])} ({best}) |"
        )
    lines += [
        "",
        "## Brier score and PR-AUC by cutoff",
        "",
        "| cutoff | "
        + " | ".join(f"{m} Brier" for m in MODELS[:-1])
        + " | cln PR-AUC | best baseline PR-AUC |",
        "|" + " --- |" * (2 + len(MODELS)),
    ]
    for c in r.cutoffs:
        cells = " | ".join(_f(c.models[m].brier) for m in MODELS[:-1])
        best_pr = max(c.models[b].pr_auc for b in BASELINES)
        lines.append(f"| {c.cutoff} | {cells} | {_f(c.models['cln'].pr_auc)} | {_f(best_pr)} |")
    lines += [
        "",
        "## Network against each model (paired bootstrap of the AUC difference)",
        "",
        "| cutoff | " + " | ".join(f"cln - {m}" for m in MODELS[1:]) + " |",
        "|" + " --- |" * len(MODELS),
    ]
    for c in r.cutoffs:
        lines.append(
            f"| {c.cutoff} | " + " | ".join(_ci(c.bootstrap[f"cln_vs_{m}"]) for m in MODELS[1:]) + " |"
        )
    lines.append("| mean over cutoffs | " + " | ".join(_ci(s.mean_diff_vs[m]) for m in MODELS[1:]) + " |")
    lines += [
        "",
        "## By tenure (days since the first purchase at the cutoff)",
        "",
        f"Buckets with fewer than {MIN_CLASS} customers of a class are not scored.",
        "",
        f"| cutoff | bucket | customers | buyers | {names} (AUC) | cln Brier | best Brier |",
        "|" + " --- |" * (6 + len(MODELS)),
    ]
    for c in r.cutoffs:
        for b in c.tenure:
            if not b.models:
                if b.n:
                    lines.append(
                        f"| {c.cutoff} | {b.name} | {b.n} | {b.positives} |" + " - |" * (2 + len(MODELS))
                    )
                continue
            cells = " | ".join(_f(b.models[m].roc_auc) for m in MODELS)
            best_brier = min(b.models[m].brier or math.inf for m in BASELINES)
            lines.append(
                f"| {c.cutoff} | {b.name} | {b.n} | {b.positives} | {cells} | "
                f"{_f(b.models['cln'].brier)} | {_f(best_brier)} |"
            )
    lines += [
        "",
        "## Summary",
        "",
        "| model | mean AUC | mean Brier |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {m} | {_f(s.mean_auc[m])} | {_f(s.mean_brier.get(m))} |" for m in MODELS]
    lines += [
        "",
        f"- best baseline by mean AUC: {s.best_baseline_by_mean_auc}; cln - it, averaged over cutoffs: "
        f"{_ci(s.mean_diff_vs_best)}",
        f"- worst AUC gap (cln - best baseline): {_signed(s.worst_auc_gap['gap'])} at "
        f"{s.worst_auc_gap['where']} (95% CI [{_signed(s.worst_auc_gap['ci95'][0])}, "
        f"{_signed(s.worst_auc_gap['ci95'][1])}])",
        f"- worst Brier gap (cln - best baseline): {_signed(s.worst_brier_gap['gap'])} at "
        f"{s.worst_brier_gap['where']}",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- {name}: {'met' if ok else 'MISSED'}" for name, ok in s.targets.items()]
    for m in s.missed_level:
        lo, hi = m["ci95"]
        lines.append(
            f"  - level missed at {m['where']} ({m['customers']} customers): AUC gap {_signed(m['auc_gap'])} "
            f"[{_signed(lo)}, {_signed(hi)}], Brier gap {_signed(m['brier_gap'])}"
        )
    lines += [f"- rule {k}: {v}" for k, v in r.rules.items()]
    lines += [
        "",
        "## Validation signals (fit-date validation customers; used to choose designs, never the test)",
        "",
        "| cutoff | cln AUC | best baseline AUC | cln AUC, half window | cln log loss | half window |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in r.cutoffs:
        v = c.validation
        best_v = max(v[f"{b}_auc"] for b in BASELINES)
        lines.append(
            f"| {c.cutoff} | {_f(v['cln_auc'])} | {_f(best_v)} | {_f(v['cln_auc_half_window'])} | "
            f"{_f(v['cln_log_loss'])} | {_f(v['cln_log_loss_half_window'])} |"
        )
    lines += ["", "![AUC by cutoff](backtest_auc.png)", ""]
    return "\n".join(lines)


def plot_auc(r: Backtest, path: Path) -> None:
    """AUC by cutoff per model: all customers, and those whose history began before the window."""
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    # dates as numbers (days since the epoch) with date labels: no category axis, no date converter
    x = np.array([np.datetime64(c.cutoff, "D").astype(np.int64) for c in r.cutoffs], dtype=np.float64)
    panels: list[tuple[str, str | None]] = [
        ("all customers", None),
        ("history beyond the window", "beyond_window"),
    ]
    for k, (title, bucket) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for m in MODELS:
            ys = [c.models[m].roc_auc if bucket is None else _bucket_auc(c, bucket, m) for c in r.cutoffs]
            ax.plot(x, ys, marker="o", linewidth=2.2 if m == "cln" else 1.2, label=m)
        ax.set(title=f"ROC-AUC by cutoff: {title}", xlabel="evaluation cutoff", ylabel="ROC-AUC")
        ax.grid(True, alpha=0.3)
        ax.set_xticks(x, [c.cutoff for c in r.cutoffs], rotation=45, ha="right")
        ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, format="png", dpi=110)


def _bucket_auc(c: CutoffResult, bucket: str, model: str) -> float:
    for b in c.tenure:
        if b.name == bucket and b.models:
            return b.models[model].roc_auc
    return math.nan
