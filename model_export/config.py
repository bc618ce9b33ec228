"""Run configuration for ``python -m model_export train``: one dataclass, defaults for CDNOW."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from service.features import DEFAULT_CHANNELS

Protocol = Literal["customer-split", "out-of-time"]

#: Per protocol: (evaluation cutoff, horizon in weeks). Customer-split is the calibration/holdout
#: split of Fader, Hardie & Lee (2005) on CDNOW; out-of-time evaluates on the last 26 weeks.
PROTOCOL_DEFAULTS: dict[Protocol, tuple[str, int]] = {
    "customer-split": ("1997-09-30", 39),
    "out-of-time": ("1997-12-31", 26),
}


@dataclass(frozen=True)
class TrainConfig:
    data: str = "cdnow"
    columns: dict[str, str] = field(default_factory=dict)
    protocol: Protocol = "customer-split"
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
    # origin_step_weeks before the training cutoff (1 = the training cutoff only). 4 measured better
    # than 1 in both protocols on CDNOW (docs/model.md, "Ablations").
    origins: int = 4
    origin_step_weeks: int = 4
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
