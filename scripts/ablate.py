"""Ablations of the CLN on CDNOW: each variant trained with the same seeds, both protocols.

Selection is by validation AUC (per-seed mean); test AUC is reported alongside, never used to choose.
Usage: python scripts/ablate.py OUT.jsonl [variant ...]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from model_export.config import PROTOCOL_DEFAULTS, TrainConfig
from model_export.train import train

BASIC = ("purchases", "log_spend", "log_quantity", "active")
NO_AGE = (
    "purchases",
    "log_spend",
    "log_quantity",
    "active",
    "log_bins_since_purchase",
    "log_frequency_total",
    "log_recency_bins",
    "log_spend_total",
)
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no_linear_skip": {"linear_skip": False},
    "lookback_26": {"lookback_bins": 26},
    "no_age_channel": {"channels": NO_AGE},
    "basic_channels": {"channels": BASIC},
    "basic_plus_recency": {"channels": (*BASIC, "log_bins_since_purchase")},
    "no_pool_last": {"pool_last": False},
    "bins_3d": {"bin_days": 3, "lookback_bins": 121},
    "conv_32": {"conv_channels": 32},
    "conv_8": {"conv_channels": 8},
    "conv_3_layers": {"conv_layers": 3},
    "dropout_0.3": {"dropout": 0.3},
    "lr_1e-3": {"lr": 1e-3, "patience": 12},
}


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(VARIANTS)
    protocols = [p for p in ("customer-split", "out-of-time") if p in (sys.argv[2:3] or [p])]
    if sys.argv[2:3] and sys.argv[2] in ("customer-split", "out-of-time"):
        names = sys.argv[3:] or list(VARIANTS)
    logging.basicConfig(level=logging.WARNING)
    for name in names:
        for protocol in protocols:
            cutoff, horizon = PROTOCOL_DEFAULTS[protocol]
            cfg = dataclasses.replace(
                TrainConfig(
                    protocol=protocol,
                    cutoff=cutoff,
                    horizon_weeks=horizon,
                    seeds=3,
                    bootstrap=200,
                    progress=False,
                ),
                **VARIANTS[name],  # type: ignore[arg-type]
            )
            t0 = time.time()
            rep = train(cfg, Path("/tmp/ablate") / name / protocol)
            row = {
                "variant": name,
                "protocol": protocol,
                "val_auc_mean_seed": sum(rep["per_seed_val_auc"]) / len(rep["per_seed_val_auc"]),
                "test_auc": rep["models"]["cln"]["roc_auc"],
                "test_brier": rep["models"]["cln"]["brier"],
                "best_baseline_auc": rep["target"]["best_baseline_auc"],
                "best_baseline_brier": rep["target"]["best_baseline_brier"],
                "level": rep["target"]["level_with_best"],
                "seconds": round(time.time() - t0, 1),
            }
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
