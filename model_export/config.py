"""Run configuration for ``python -m model_export train`` and ``backtest``: one dataclass, CDNOW defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from service.features import DEFAULT_CHANNELS

EvaluationProtocol = Literal["customer-split", "out-of-time"]

#: A cutoff spelled this way is the last one whose whole label window lies inside the data.
LATEST = "latest"

#: Per protocol: (evaluation cutoff, horizon in weeks). Customer-split is the calibration/holdout
#: split of Fader, Hardie & Lee (2005) on CDNOW. Out-of-time is what production does: fitted on the
#: latest labelled data and judged on the last horizon of the log; 13 weeks leaves CDNOW cutoffs at
#: which most customers' history began before a 52-week window, the case a real shop lives in.
PROTOCOL_DEFAULTS: dict[EvaluationProtocol, tuple[str, int]] = {
    "customer-split": ("1997-09-30", 39),
    "out-of-time": (LATEST, 13),
}
DEFAULT_PROTOCOL: EvaluationProtocol = "out-of-time"


#: Settings that say where and how a run is evaluated, not what model it fits: a backtest that
#: differs from a model only in these estimates that model.
RUN_SETTINGS = frozenset({"data", "columns", "progress", "cutoff", "protocol", "bootstrap"})


@dataclass(frozen=True)
class TrainConfig:
    data: str = "cdnow"
    columns: dict[str, str] = field(default_factory=dict)
    protocol: EvaluationProtocol = "customer-split"
    cutoff: str = "1997-09-30"
    horizon_weeks: int = 39
    # features
    lookback_bins: int = 52
    bin_days: int = 7
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    # network
    conv_channels: int = 16
    conv_layers: int = 2
    hidden: int = 64
    dropout: float = 0.3
    pool_last: bool = True
    wide: bool = False  # a linear term on the last step's channels next to the deep part
    # optimisation
    seeds: int = 1
    seed: int = 0  # the first seed; members use seed, seed + 1, ...
    epochs: int = 60
    patience: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    torch_threads: int = 1  # fixed so that two runs on one machine give identical weights
    # splits (customer-split: train / validation / test by customer; out-of-time: train / validation)
    validation_fraction: float = 0.2
    test_fraction: float = 0.2
    # rolling origins: also train on the training customers at this many cutoffs in all, every
    # origin_step_weeks before the training cutoff (1 = the training cutoff only): more and more
    # varied examples of the same customers, each label window ending before the next origin's
    origins: int = 4
    origin_step_weeks: int = 4
    # window-crop augmentation: this share of training batches sees only the latest
    # crop_min_bins..lookback_bins - 1 bins (one suffix for the whole batch), so the network meets
    # customers whose history began before its window, which no fit date of a young log holds;
    # chosen on validation customers scored through a half window (docs/model.md, "Tenure")
    crop_share: float = 0.5
    crop_min_bins: int = 8
    max_users: int | None = None  # a seeded subsample of customers, for fast tests
    bootstrap: int = 2000
    # 20: the first opset with a Gelu operator; at 18 the exporter spells GELU as Erf, Mul, Div and
    # Add, a third of the CPU time. onnxruntime's CPU provider runs Gelu-20, and its CUDA provider
    # has a Gelu-20 kernel since onnxruntime 1.18 (microsoft/onnxruntime#19560); not run here (no GPU).
    opset: int = 20
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    def model_settings(self) -> dict[str, Any]:
        """Everything but :data:`RUN_SETTINGS`."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_SETTINGS}
