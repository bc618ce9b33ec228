"""What ``train`` reports about a model: typed, written as ``report.json`` and ``report.md``.

Every part is a frozen dataclass whose fields are, in order, the keys of ``report.json``: the JSON
is ``asdict`` plus two per-seed views and the feature spec's own dictionary, and reading it back
rebuilds the same objects. The Markdown renderer reads the typed report only.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from model_export.baselines import BASELINES
from model_export.data import CleaningReport
from model_export.files import write_atomic
from model_export.metrics import METRIC_KEYS, AucDiff, BinaryMetrics, ReliabilityBin, calibration_error
from service.features import FeatureSpec

_TARGET_RULE = "level = AUC >= best - 0.002 and Brier <= best + 0.001; beats BG/NBD = bootstrap CI above 0"


@dataclass(frozen=True)
class DataSummary:
    source: str
    fingerprint: str
    cleaning: CleaningReport


@dataclass(frozen=True)
class SplitSizes:
    """Customers per part; ``train_examples`` counts each training customer once per origin."""

    train: int
    train_examples: int
    origins: int
    validation: int
    test: int
    train_as_of: str
    test_as_of: str


@dataclass(frozen=True)
class Target:
    """The network against the baselines on the test customers, judged by :data:`_TARGET_RULE`."""

    beats_bgnbd: bool
    best_baseline: str
    best_baseline_auc: float
    best_baseline_brier: float
    level_with_best: bool
    beats_best_auc: bool
    rule: str

    @classmethod
    def of(cls, models: Mapping[str, BinaryMetrics], bootstrap: Mapping[str, AucDiff]) -> Target:
        best = max(BASELINES, key=lambda b: models[b].roc_auc)
        best_brier = min(models[b].brier for b in BASELINES)
        cln = models["cln"]
        return cls(
            beats_bgnbd=bool(bootstrap["cln_vs_bgnbd"].ci95[0] > 0),
            best_baseline=best,
            best_baseline_auc=models[best].roc_auc,
            best_baseline_brier=best_brier,
            level_with_best=bool(
                cln.roc_auc >= models[best].roc_auc - 0.002 and cln.brier <= best_brier + 0.001
            ),
            beats_best_auc=bool(cln.roc_auc > models[best].roc_auc),
            rule=_TARGET_RULE,
        )


@dataclass(frozen=True)
class BacktestCutoff:
    cutoff: str
    customers: int
    beyond_window: float  # share of customers whose history began before the feature window
    cln_auc: float
    best_baseline: str
    best_auc: float
    recency_auc: float
    cln_brier: float
    best_brier: float


@dataclass(frozen=True)
class BacktestQuote:
    """A ``backtest.json``'s figures, quoted as the estimate of how the model will do."""

    source: str
    created_at: str | None
    horizon_weeks: int | None
    same_data_and_settings: bool
    differences: list[str]  # settings that differ from the model's, "data" first when the data does
    cutoffs: list[BacktestCutoff]
    mean_auc: dict[str, float]
    mean_diff_vs_best: AucDiff
    best_baseline_by_mean_auc: str
    worst_auc_gap: dict[str, Any]  # as backtest.Summary writes them
    worst_brier_gap: dict[str, Any]
    targets: dict[str, bool]

    @classmethod
    def read(cls, path: Path, settings: Mapping[str, Any], fingerprint: str) -> BacktestQuote:
        """The backtest at ``path``, with where it differs from a model of ``settings`` trained on
        data of ``fingerprint``; a backtest of other settings is quoted all the same."""
        bt = json.loads(path.read_text())
        theirs = bt.get("hyperparameters", {})
        differences = sorted(k for k in settings.keys() | theirs.keys() if settings.get(k) != theirs.get(k))
        if bt.get("data", {}).get("fingerprint") != fingerprint:
            differences.insert(0, "data")
        rows = []
        for c in bt["cutoffs"]:
            models = c["models"]
            best = max(BASELINES, key=lambda b: models[b]["roc_auc"])
            rows.append(
                BacktestCutoff(
                    cutoff=c["cutoff"],
                    customers=c["n_test"],
                    beyond_window=c["share_beyond_window"],
                    cln_auc=models["cln"]["roc_auc"],
                    best_baseline=best,
                    best_auc=models[best]["roc_auc"],
                    recency_auc=models["recency"]["roc_auc"],
                    cln_brier=models["cln"]["brier"],
                    best_brier=min(models[b]["brier"] for b in BASELINES),
                )
            )
        summary = bt["summary"]
        return cls(
            source=str(path),
            created_at=bt.get("created_at"),
            horizon_weeks=bt.get("horizon_weeks"),
            same_data_and_settings=not differences,
            differences=differences,
            cutoffs=rows,
            mean_auc=summary["mean_auc"],
            mean_diff_vs_best=_decode(AucDiff, summary["mean_diff_vs_best"]),
            best_baseline_by_mean_auc=summary["best_baseline_by_mean_auc"],
            worst_auc_gap=summary["worst_auc_gap"],
            worst_brier_gap=summary["worst_brier_gap"],
            targets=summary["targets"],
        )


@dataclass(frozen=True)
class SeedRun:
    """One ensemble member's training: early stopping kept ``best_epoch`` of ``epochs_run``."""

    seed: int
    epochs_run: int
    best_epoch: int
    val_loss: float
    val_auc: float


@dataclass(frozen=True)
class Report:
    """One training run, as ``train`` returns it and ``report.json`` holds it."""

    protocol: str
    cutoff: str
    horizon_weeks: int
    n_users: int
    base_rate: float
    train_seconds: float
    onnx_parity_max_abs_diff: float
    model_version: str
    created_at: str
    n_parameters: int
    data: DataSummary
    split: SplitSizes
    models: dict[str, BinaryMetrics]  # test metrics, each at its threshold chosen on validation
    bootstrap: dict[str, AucDiff]  # "cln_vs_<baseline>"
    reliability: dict[str, list[ReliabilityBin]]
    target: Target
    hyperparameters: dict[str, Any]
    backtest: BacktestQuote | None
    feature_spec: FeatureSpec
    per_seed: list[SeedRun]
    plots: dict[str, str]  # name -> file next to the report

    @property
    def seeds(self) -> list[int]:
        return [s.seed for s in self.per_seed]

    @property
    def per_seed_val_auc(self) -> list[float]:
        return [s.val_auc for s in self.per_seed]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["feature_spec"] = self.feature_spec.to_dict()
        # the two per-seed lists readers of report.json use come before the full records
        per_seed, plots = out.pop("per_seed"), out.pop("plots")
        views = {"seeds": self.seeds, "per_seed_val_auc": self.per_seed_val_auc}
        return out | views | {"per_seed": per_seed, "plots": plots}

    def to_json(self) -> str:
        """``report.json``'s text; a NaN is a ValueError, as it is not valid JSON."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Report:
        """A report read back from :meth:`to_json`'s text; a missing field is a ValueError naming it."""
        report: Report = _decode(cls, json.loads(text))
        return report


def _decode(tp: Any, value: Any) -> Any:
    """``value`` parsed from JSON, rebuilt as ``tp``: dataclasses, lists, tuples, dicts, optionals."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _decode(inner, value)
    if origin is list:
        return [_decode(args[0], v) for v in value]
    if origin is tuple:
        return tuple(_decode(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        return {k: _decode(args[1], v) for k, v in value.items()}
    if tp is FeatureSpec:
        return FeatureSpec.from_dict(value)
    if is_dataclass(tp) and isinstance(tp, type):
        missing = [f.name for f in fields(tp) if f.name not in value]
        if missing:
            raise ValueError(f"{tp.__name__} lacks {', '.join(missing)}")
        hints = get_type_hints(tp)
        return tp(**{f.name: _decode(hints[f.name], value[f.name]) for f in fields(tp)})
    return value


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


def render_markdown(report: Report) -> str:
    """``report.md``: the headline facts, then one section per part of the report."""
    r = report
    out = [f"# Purchase intent: {r.protocol}, cutoff {r.cutoff}, horizon {r.horizon_weeks} weeks", ""]
    facts = [
        ("model version", r.model_version),
        ("users", r.n_users),
        ("base rate", r.base_rate),
        ("train seconds", r.train_seconds),
        ("ONNX parity (max abs diff)", r.onnx_parity_max_abs_diff),
        ("seeds", r.seeds),
        ("data source", r.data.source),
        ("data fingerprint", r.data.fingerprint),
    ]
    out += [f"- {k}: {_fmt(v)}" for k, v in facts]
    out.append("")

    out += ["## Test metrics", ""]
    rows = [[name, *(_fmt(getattr(m, k)) for k in METRIC_KEYS)] for name, m in r.models.items()]
    out += [*_table(["model", *METRIC_KEYS], rows), ""]

    out += ["## Paired bootstrap of the AUC difference", ""]
    rows = [
        [
            name,
            _fmt(b.auc_diff),
            f"[{_fmt(b.ci95[0])}, {_fmt(b.ci95[1])}]",
            _fmt(b.ci95[0] > 0.0),
            _fmt(b.p_value_one_sided),
            _fmt(b.n_boot),
        ]
        for name, b in r.bootstrap.items()
    ]
    header = ["comparison", "AUC diff", "95% CI", "CI above 0", "p (one-sided)", "replicates"]
    out += [*_table(header, rows), ""]

    out += ["## Target", "", *(f"- {k}: {_fmt(v)}" for k, v in asdict(r.target).items()), ""]
    if r.backtest is not None:
        out += _backtest_section(r.backtest)
    cleaning = [[k, _fmt(v)] for k, v in asdict(r.data.cleaning).items()]
    out += ["## Data cleaning", "", *_table(["step", "rows"], cleaning), ""]
    split = [[k, _fmt(v)] for k, v in asdict(r.split).items()]
    out += ["## Split (users)", "", *_table(["part", "users"], split), ""]
    out += _calibration_section(r.reliability)

    out += [
        "## Training",
        "",
        f"- validation AUC per seed: {', '.join(_fmt(v) for v in r.per_seed_val_auc)}",
        "",
    ]
    out += ["```json", json.dumps(r.hyperparameters, indent=2, sort_keys=True), "```", ""]
    out += ["## Plots", "", *(f"![{name}]({file})" for name, file in r.plots.items()), ""]
    return "\n".join(out).rstrip() + "\n"


def _calibration_section(reliability: Mapping[str, list[ReliabilityBin]]) -> list[str]:
    """The network's reliability bins as a table, every other model's on one line."""
    main = "cln" if "cln" in reliability else next(iter(reliability))
    header = ["bin", "count", "mean predicted", "observed rate"]
    rows = [
        [
            # the top bin is closed: a prediction of exactly 1 belongs to it
            f"[{_fmt(b.bin_lower, 2)}, {_fmt(b.bin_upper, 2)}" + ("]" if b.bin_upper >= 1.0 else ")"),
            _fmt(b.count),
            _fmt(b.mean_predicted),
            _fmt(b.observed_rate),
        ]
        for b in reliability[main]
    ]
    ece = _fmt(calibration_error(reliability[main]))
    out = ["## Calibration", "", f"{main} (ECE {ece}):", "", *_table(header, rows), ""]
    for name, bins in reliability.items():
        if name == main:
            continue
        cells = ", ".join(
            f"{_fmt(b.mean_predicted, 2)}->{_fmt(b.observed_rate, 2)} (n={_fmt(b.count)})" for b in bins
        )
        out.append(f"- {name} (ECE {_fmt(calibration_error(bins))}): predicted->observed {cells}")
    return [*out, ""]


def _backtest_section(bt: BacktestQuote) -> list[str]:
    """How the model is expected to do: the rolling backtest's figures, and where they come from."""
    where = f"from `{bt.source}` ({bt.created_at}), horizon {bt.horizon_weeks} weeks"
    out = ["## Expected performance: rolling-origin backtest", "", f"Figures {where}."]
    if bt.same_data_and_settings:
        out.append("It was run on the same data with the same settings as this model.")
    else:
        out.append(f"It differs from this model in: {', '.join(bt.differences)}.")
    out.append("")
    header = ["cutoff", "customers", "beyond window", "cln AUC", "best baseline AUC", "recency AUC"]
    header += ["cln Brier", "best Brier"]
    rows = [
        [
            c.cutoff,
            _fmt(c.customers),
            f"{c.beyond_window:.0%}",
            _fmt(c.cln_auc),
            f"{_fmt(c.best_auc)} ({c.best_baseline})",
            _fmt(c.recency_auc),
            _fmt(c.cln_brier),
            _fmt(c.best_brier),
        ]
        for c in bt.cutoffs
    ]
    out += [*_table(header, rows), ""]
    diff, worst = bt.mean_diff_vs_best, bt.worst_auc_gap
    out.append(
        f"- mean AUC over cutoffs, cln - {bt.best_baseline_by_mean_auc}: {_fmt(diff.auc_diff)} "
        f"[{_fmt(diff.ci95[0])}, {_fmt(diff.ci95[1])}]; worst gap to the best baseline "
        f"{_fmt(worst.get('gap'))} at {worst.get('where')}"
    )
    out += [f"- {k}: {'met' if v else 'missed'}" for k, v in bt.targets.items()]
    return [*out, ""]


def write_report(report: Report, out_dir: Path) -> None:
    """Write ``report.json`` and ``report.md`` atomically into ``out_dir``.

    Both texts are built before anything is written, so a report that cannot be written (a NaN)
    leaves the directory untouched.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_text = report.to_json()
    md_text = render_markdown(report)
    write_atomic(json_text.encode("utf-8"), out_dir / "report.json")
    write_atomic(md_text.encode("utf-8"), out_dir / "report.md")
