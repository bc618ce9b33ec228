"""The trained model's figures: ROC curves and a reliability diagram, one line per model, as PNG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import roc_curve

from model_export.metrics import as_labels, as_scores, calibration_error, reliability_table, roc_auc


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
    labels = as_labels(y)
    fig, ax = _new_axes("ROC", "false positive rate", "true positive rate")
    for name, p in scores.items():
        s = as_scores(p, labels.size)
        fpr, tpr, _ = roc_curve(labels, s)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {roc_auc(labels, s):.4f})")
    ax.legend(loc="lower right")
    fig.savefig(Path(path), format="png", dpi=120)


def plot_calibration(y: ArrayLike, scores: Mapping[str, ArrayLike], path: Path, n_bins: int = 10) -> None:
    """Reliability diagram: observed rate against mean prediction per bin, Brier in the legend."""
    labels = as_labels(y)
    fig, ax = _new_axes("Calibration", "mean predicted probability", "observed rate")
    for name, p in scores.items():
        s = as_scores(p, labels.size)
        bins = reliability_table(labels, s, n_bins)
        brier = float(np.mean((s - labels) ** 2))
        ax.plot(
            [b.mean_predicted for b in bins],
            [b.observed_rate for b in bins],
            marker="o",
            linewidth=1.5,
            label=f"{name} (Brier {brier:.4f}, ECE {calibration_error(bins):.4f})",
        )
    ax.legend(loc="upper left")
    fig.savefig(Path(path), format="png", dpi=120)
