"""Metrics, significance, calibration, plots and the written report for a trained model.

Every model is scored on the same users, so comparisons use a *paired* bootstrap: one set of
resampled users per replicate, both models' AUCs computed on it. AUC is computed from tie groups
of the score with per-user counts, which makes a replicate a couple of bincounts and a cumsum
instead of a sort, and gives exactly the Mann-Whitney statistic (ties count one half), the same
number sklearn's ``roc_auc_score`` reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from model_export.files import write_atomic

#: Keeps log loss finite (the baselines clip their probabilities to it too); the resolution of the
#: network's float32 outputs near 1.
PROBA_EPS = 1e-7

#: Keys of :func:`binary_metrics`, in the order reports show them.
METRIC_KEYS: tuple[str, ...] = (
    "roc_auc",
    "pr_auc",
    "log_loss",
    "brier",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "threshold",
)

#: Bootstrap draws (users x replicates) per vectorised chunk: bounds the working set to ~100 MB.
_BOOT_CHUNK_DRAWS = 1_500_000


def _labels(y: ArrayLike) -> NDArray[np.int64]:
    arr = np.asarray(y).reshape(-1)
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError("labels must be 0/1")
    return arr.astype(np.int64)


def _scores(p: ArrayLike, n: int) -> NDArray[np.float64]:
    arr = np.asarray(p, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"got {arr.size} scores for {n} labels")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores must be finite")
    return arr


def _tie_groups(p: NDArray[np.float64]) -> tuple[NDArray[np.int64], int]:
    """Group id per user, ascending in score; equal scores share a group."""
    _, inverse = np.unique(p, return_inverse=True)
    group = inverse.astype(np.int64).reshape(-1)
    return group, int(group.max()) + 1 if group.size else 0


def _auc_from_groups(pos: NDArray[np.float64], neg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Mann-Whitney AUC from positive / negative counts per ascending tie group (last axis).

    Each positive beats every negative in a lower group and ties with half of those in its own.
    NaN where a row has no positive or no negative. Counts are integers (or halves), so the sums
    are exact in float64 far beyond any realistic number of users.
    """
    neg_below = np.cumsum(neg, axis=-1) - neg
    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=-1)
    pairs = np.sum(pos, axis=-1) * np.sum(neg, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)
    return np.asarray(auc, dtype=np.float64)


def roc_auc(y: ArrayLike, p: ArrayLike) -> float:
    """ROC AUC by ranks (ties count one half); equals sklearn's ``roc_auc_score``."""
    labels = _labels(y)
    scores = _scores(p, labels.size)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("ROC AUC needs both classes in y")
    group, n_groups = _tie_groups(scores)
    pos = np.bincount(group, weights=labels, minlength=n_groups).astype(np.float64)
    neg = np.bincount(group, minlength=n_groups).astype(np.float64) - pos
    return float(_auc_from_groups(pos, neg))


def best_f1_threshold(y: ArrayLike, p: ArrayLike) -> float:
    """The score value ``t`` whose rule ``p >= t`` has the highest F1 (pick it on validation).

    Thresholds come from the precision-recall curve, so each is an actual score and applying it
    reproduces the F1 found here exactly; ties go to the lowest such threshold.
    """
    labels = _labels(y)
    scores = _scores(p, labels.size)
    if labels.sum() == 0:
        raise ValueError("best F1 threshold needs at least one positive")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # the curve's last point (precision 1, recall 0) has no threshold
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def binary_metrics(y: ArrayLike, p: ArrayLike, threshold: float) -> dict[str, float]:
    """Ranking, probabilistic and thresholded metrics for one model (keys: :data:`METRIC_KEYS`).

    A user is predicted positive when ``p >= threshold``. Precision is 0 (not a warning) when
    nothing is predicted positive, so a degenerate threshold shows up as a number in the report.
    """
    labels = _labels(y)
    scores = _scores(p, labels.size)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError("metrics need both classes in y (AUC and average precision are undefined)")
    clipped = np.clip(scores, PROBA_EPS, 1.0 - PROBA_EPS)
    log_loss = -float(np.mean(labels * np.log(clipped) + (1 - labels) * np.log1p(-clipped)))
    brier = float(np.mean((scores - labels) ** 2))

    predicted = scores >= threshold
    positive = labels == 1
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    fn = int(np.sum(~predicted & positive))
    tn = int(labels.size - tp - fp - fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "roc_auc": roc_auc(labels, scores),
        "pr_auc": float(average_precision_score(labels, scores)),
        "log_loss": log_loss,
        "brier": brier,
        "accuracy": (tp + tn) / labels.size,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "threshold": float(threshold),
    }


def bootstrap_auc_diffs(
    y: ArrayLike,
    p_a: ArrayLike,
    p_b: ArrayLike,
    n_boot: int = 2000,
    seed: int = 0,
) -> NDArray[np.float64]:
    """AUC(a) - AUC(b) on ``n_boot`` paired resamples of the users (NaN where a draw has one class).

    The same ``seed`` and user count give the same draws whatever the scores, so replicate ``k`` of
    several comparisons (or several evaluation dates) can be combined, e.g. averaged across dates.
    """
    labels = _labels(y)
    a = _scores(p_a, labels.size)
    b = _scores(p_b, labels.size)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = labels.size
    group_a, n_a = _tie_groups(a)
    group_b, n_b = _tie_groups(b)
    # A replicate is a count per user; resampling users only changes the counts, so each model's
    # AUC is per-group class counts (two bincounts) and a cumsum, with no re-sorting.
    pos_w = labels.astype(np.float64)
    rng = np.random.default_rng(seed)
    diffs: list[NDArray[np.float64]] = []
    chunk = max(1, _BOOT_CHUNK_DRAWS // max(n, 1))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n))  # [rows, n] users drawn per replicate
        row_of = np.arange(rows, dtype=np.int64)[:, None]
        is_pos = pos_w[idx].ravel()
        auc_per_model = []
        for group, n_groups in ((group_a, n_a), (group_b, n_b)):
            key = (row_of * n_groups + group[idx]).ravel()
            total = np.bincount(key, minlength=rows * n_groups).astype(np.float64)
            pos = np.bincount(key, weights=is_pos, minlength=rows * n_groups).astype(np.float64)
            total, pos = total.reshape(rows, n_groups), pos.reshape(rows, n_groups)
            auc_per_model.append(_auc_from_groups(pos, total - pos))
        diffs.append(auc_per_model[0] - auc_per_model[1])
    return np.concatenate(diffs)


def summarise_diffs(point: float, diffs: NDArray[np.float64]) -> dict[str, Any]:
    """Point difference, 95% percentile interval and one-sided p-value of bootstrap replicates."""
    kept = diffs[np.isfinite(diffs)]
    if kept.size == 0:
        raise ValueError("every bootstrap replicate drew a single class; need more users")
    lo, hi = np.percentile(kept, [2.5, 97.5])
    return {
        "auc_diff": float(point),
        "ci95": [float(lo), float(hi)],
        "n_boot": int(kept.size),
        "p_value_one_sided": float(np.mean(kept <= 0.0)),
    }


def paired_bootstrap_auc(
    y: ArrayLike,
    p_a: ArrayLike,
    p_b: ArrayLike,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap of AUC(a) - AUC(b): resample users, score both models on the same sample.

    Returns the full-data difference, a 95% percentile interval, the number of replicates used
    (replicates that drew a single class are skipped) and the one-sided p-value: the fraction of
    replicates where model a is not better (diff <= 0).
    """
    diffs = bootstrap_auc_diffs(y, p_a, p_b, n_boot, seed)
    return summarise_diffs(roc_auc(y, p_a) - roc_auc(y, p_b), diffs)


def reliability_table(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> list[dict[str, float]]:
    """Observed positive rate per equal-width bin of predicted probability on ``[0, 1]``.

    Empty bins are omitted, so ``count`` sums to the number of users. A prediction of exactly 1
    falls in the last bin.
    """
    labels = _labels(y)
    scores = _scores(p, labels.size)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if np.any((scores < 0.0) | (scores > 1.0)):
        raise ValueError("reliability needs probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.minimum((scores * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    sum_p = np.bincount(bins, weights=scores, minlength=n_bins)
    sum_y = np.bincount(bins, weights=labels, minlength=n_bins)
    rows: list[dict[str, float]] = []
    for k in np.flatnonzero(count):
        rows.append(
            {
                "bin_lower": float(edges[k]),
                "bin_upper": float(edges[k + 1]),
                "count": int(count[k]),
                "mean_predicted": float(sum_p[k] / count[k]),
                "observed_rate": float(sum_y[k] / count[k]),
            }
        )
    return rows


def _ece_from_rows(rows: Sequence[Mapping[str, Any]]) -> float:
    n = sum(int(r["count"]) for r in rows)
    if n == 0:
        return math.nan
    gap = sum(int(r["count"]) * abs(float(r["mean_predicted"]) - float(r["observed_rate"])) for r in rows)
    return float(gap / n)


def expected_calibration_error(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """Count-weighted mean |mean predicted - observed rate| over the reliability bins."""
    return _ece_from_rows(reliability_table(y, p, n_bins))


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    # A bare Figure with its own Agg canvas: no pyplot, no global backend switch, thread-safe.
    fig = Figure(figsize=(6.0, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.6", linewidth=1.0, label="_diagonal")
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_roc(y: ArrayLike, scores: Mapping[str, ArrayLike], path: Path) -> None:
    """One ROC curve per model, AUC in the legend, written as PNG."""
    labels = _labels(y)
    fig, ax = _new_axes("ROC", "false positive rate", "true positive rate")
    for name, p in scores.items():
        s = _scores(p, labels.size)
        fpr, tpr, _ = roc_curve(labels, s)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {roc_auc(labels, s):.4f})")
    ax.legend(loc="lower right")
    fig.savefig(Path(path), format="png", dpi=120)


def plot_calibration(y: ArrayLike, scores: Mapping[str, ArrayLike], path: Path, n_bins: int = 10) -> None:
    """Reliability diagram: observed rate against mean prediction per bin, Brier in the legend."""
    labels = _labels(y)
    fig, ax = _new_axes("Calibration", "mean predicted probability", "observed rate")
    for name, p in scores.items():
        s = _scores(p, labels.size)
        rows = reliability_table(labels, s, n_bins)
        brier = float(np.mean((s - labels) ** 2))
        ax.plot(
            [r["mean_predicted"] for r in rows],
            [r["observed_rate"] for r in rows],
            marker="o",
            linewidth=1.5,
            label=f"{name} (Brier {brier:.4f}, ECE {_ece_from_rows(rows):.4f})",
        )
    ax.legend(loc="upper left")
    fig.savefig(Path(path), format="png", dpi=120)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0.0 and abs(value) < 10.0 ** (-digits):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _as_mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def render_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable report; sections whose data is missing are left out."""
    protocol = report.get("protocol", "?")
    cutoff = report.get("cutoff", "?")
    horizon = report.get("horizon_weeks", "?")
    out = [f"# Purchase intent: {protocol}, cutoff {cutoff}, horizon {horizon} weeks", ""]

    facts = [
        ("model version", report.get("model_version")),
        ("users", report.get("n_users")),
        ("base rate", report.get("base_rate")),
        ("train seconds", report.get("train_seconds")),
        ("ONNX parity (max abs diff)", report.get("onnx_parity_max_abs_diff")),
        ("seeds", report.get("seeds")),
    ]
    data = _as_mapping(report.get("data"))
    facts += [("data source", data.get("source")), ("data fingerprint", data.get("fingerprint"))]
    out += [f"- {k}: {_fmt(v)}" for k, v in facts if v is not None]
    out.append("")

    models = _as_mapping(report.get("models"))
    if models:
        out += ["## Test metrics", ""]
        rows = [[name, *(_fmt(_as_mapping(m).get(k)) for k in METRIC_KEYS)] for name, m in models.items()]
        out += [*_table(["model", *METRIC_KEYS], rows), ""]

    boot = _as_mapping(report.get("bootstrap"))
    if boot:
        out += ["## Paired bootstrap of the AUC difference", ""]
        rows = []
        for name, b in boot.items():
            bm = _as_mapping(b)
            ci = bm.get("ci95") or [None, None]
            above = ci[0] is not None and float(ci[0]) > 0.0
            rows.append(
                [
                    name,
                    _fmt(bm.get("auc_diff")),
                    f"[{_fmt(ci[0])}, {_fmt(ci[1])}]",
                    _fmt(above),
                    _fmt(bm.get("p_value_one_sided")),
                    _fmt(bm.get("n_boot")),
                ]
            )
        header = ["comparison", "AUC diff", "95% CI", "CI above 0", "p (one-sided)", "replicates"]
        out += [*_table(header, rows), ""]

    target = _as_mapping(report.get("target"))
    if target:
        out += ["## Target", ""]
        out += [f"- {k}: {_fmt(v)}" for k, v in target.items()]
        out.append("")

    estimate = _as_mapping(report.get("backtest"))
    if estimate:
        out += _backtest_section(estimate)

    cleaning = _as_mapping(data.get("cleaning"))
    if cleaning:
        out += ["## Data cleaning", ""]
        out += [*_table(["step", "rows"], [[k, _fmt(v)] for k, v in cleaning.items()]), ""]

    split = _as_mapping(report.get("split"))
    if split:
        out += ["## Split (users)", ""]
        out += [*_table(["part", "users"], [[k, _fmt(v)] for k, v in split.items()]), ""]

    reliability = _as_mapping(report.get("reliability"))
    if reliability:
        out += ["## Calibration", ""]
        main = "cln" if "cln" in reliability else next(iter(reliability))
        main_rows = [_as_mapping(r) for r in reliability[main] or []]
        header = ["bin", "count", "mean predicted", "observed rate"]
        rows = [
            [
                # the top bin is closed: a prediction of exactly 1 belongs to it
                f"[{_fmt(r.get('bin_lower'), 2)}, {_fmt(r.get('bin_upper'), 2)}"
                + ("]" if float(r.get("bin_upper", 0.0)) >= 1.0 else ")"),
                _fmt(r.get("count")),
                _fmt(r.get("mean_predicted")),
                _fmt(r.get("observed_rate")),
            ]
            for r in main_rows
        ]
        out += [f"{main} (ECE {_fmt(_ece_from_rows(main_rows))}):", "", *_table(header, rows), ""]
        for name, model_rows in reliability.items():
            if name == main:
                continue
            mrows = [_as_mapping(r) for r in model_rows or []]
            cells = ", ".join(
                f"{_fmt(r.get('mean_predicted'), 2)}->{_fmt(r.get('observed_rate'), 2)}"
                f" (n={_fmt(r.get('count'))})"
                for r in mrows
            )
            out.append(f"- {name} (ECE {_fmt(_ece_from_rows(mrows))}): predicted->observed {cells}")
        out.append("")

    per_seed = report.get("per_seed_val_auc")
    hyper = _as_mapping(report.get("hyperparameters"))
    if per_seed or hyper:
        out += ["## Training", ""]
        if per_seed:
            out += [f"- validation AUC per seed: {', '.join(_fmt(v) for v in per_seed)}", ""]
        if hyper:
            out += ["```json", json.dumps(hyper, indent=2, sort_keys=True, default=_json_default), "```", ""]

    ablations = report.get("ablations")
    if ablations:
        out += ["## Ablations", ""]
        rows = [
            [
                str(_as_mapping(a).get("name", "?")),
                _fmt(_as_mapping(a).get("val_auc")),
                _fmt(_as_mapping(a).get("test_auc")),
                str(_as_mapping(a).get("note", "")),
            ]
            for a in ablations
        ]
        out += [*_table(["ablation", "val AUC", "test AUC", "note"], rows), ""]

    plots = _as_mapping(report.get("plots"))
    if plots:
        out += ["## Plots", ""]
        out += [f"![{name}]({file})" for name, file in plots.items()]
        out.append("")

    return "\n".join(out).rstrip() + "\n"


def _backtest_section(bt: Mapping[str, Any]) -> list[str]:
    """How the model is expected to do: the rolling backtest's figures, and where they come from."""
    same = bool(bt.get("same_data_and_settings"))
    where = f"from `{bt.get('source')}` ({bt.get('created_at')}), horizon {bt.get('horizon_weeks')} weeks"
    out = ["## Expected performance: rolling-origin backtest", "", f"Figures {where}."]
    if same:
        out.append("It was run on the same data with the same settings as this model.")
    else:
        out.append(f"It differs from this model in: {', '.join(bt.get('differences') or [])}.")
    out.append("")
    header = ["cutoff", "customers", "beyond window", "cln AUC", "best baseline AUC", "recency AUC"]
    header += ["cln Brier", "best Brier"]
    rows = [
        [
            str(c.get("cutoff")),
            _fmt(c.get("customers")),
            f"{float(c.get('beyond_window', 0.0)):.0%}",
            _fmt(c.get("cln_auc")),
            f"{_fmt(c.get('best_auc'))} ({c.get('best_baseline')})",
            _fmt(c.get("recency_auc")),
            _fmt(c.get("cln_brier")),
            _fmt(c.get("best_brier")),
        ]
        for c in (_as_mapping(r) for r in bt.get("cutoffs") or [])
    ]
    out += [*_table(header, rows), ""]
    diff = _as_mapping(bt.get("mean_diff_vs_best"))
    ci = diff.get("ci95") or [None, None]
    worst = _as_mapping(bt.get("worst_auc_gap"))
    out.append(
        f"- mean AUC over cutoffs, cln - {bt.get('best_baseline_by_mean_auc')}: {_fmt(diff.get('auc_diff'))} "
        f"[{_fmt(ci[0])}, {_fmt(ci[1])}]; worst gap to the best baseline {_fmt(worst.get('gap'))} at "
        f"{worst.get('where')}"
    )
    out += [f"- {k}: {'met' if v else 'missed'}" for k, v in _as_mapping(bt.get("targets")).items()]
    return [*out, ""]


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays reach the report from metric code; NaN still fails (allow_nan=False)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(report: Mapping[str, Any], out_dir: Path) -> None:
    """Write ``report.json`` and ``report.md`` atomically into ``out_dir``.

    Both texts are built before anything is written, so a report with a NaN (rejected by
    ``allow_nan=False``: it is not valid JSON) leaves the directory untouched.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_text = json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n"
    md_text = render_markdown(report)
    write_atomic(json_text.encode("utf-8"), out / "report.json")
    write_atomic(md_text.encode("utf-8"), out / "report.md")
