"""Ablations of the CLN on CDNOW: each variant changes the defaults in one way, same seeds, both protocols.

    .venv/bin/python scripts/ablate.py OUT.jsonl [--protocol customer-split|out-of-time] [--seeds 3]
                                       [variant ...]

Prints one JSON line per (variant, protocol) and appends it to OUT.jsonl. Validation AUC is the
mean over seeds at the training cutoff; test AUC/Brier are the ensemble on the test users. Close
variants are hard to tell apart: validation barely separates them and cannot see the out-of-time
shift, so read the test columns with their noise in mind (docs/model.md, "Ablations").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from model_export.config import PROTOCOL_DEFAULTS, TrainConfig
from model_export.train import train
from service.features import ALL_CHANNELS, DEFAULT_CHANNELS

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "all_channels": {"channels": ALL_CHANNELS},  # + customer age, + cumulative spend
    "basic_channels": {"channels": ("purchases", "log_spend", "log_quantity", "active")},
    "dropout_0.1": {"dropout": 0.1},
    "no_pool_last": {"pool_last": False},
    "conv_8": {"conv_channels": 8},
    "conv_32": {"conv_channels": 32},
    "conv_3_layers": {"conv_layers": 3},
    "bins_3d": {"bin_days": 3, "lookback_bins": 121},
    "lookback_26": {"lookback_bins": 26},
    "weight_decay_1e-3": {"weight_decay": 1e-3},
    "origins_4x4w": {"origins": 4, "origin_step_weeks": 4},
    "origins_7x2w": {"origins": 7, "origin_step_weeks": 2},
    "dropout_0.5": {"dropout": 0.5},
    "hidden_16": {"hidden": 16},
    "small": {"conv_channels": 8, "hidden": 16},
    "no_active": {"channels": tuple(c for c in DEFAULT_CHANNELS if c != "active")},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--protocol", choices=sorted(PROTOCOL_DEFAULTS), action="append")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("variants", nargs="*", help=f"default: all of {', '.join(VARIANTS)}")
    args = parser.parse_intermixed_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    logging.basicConfig(level=logging.WARNING)
    for name in args.variants or list(VARIANTS):
        for protocol in args.protocol or sorted(PROTOCOL_DEFAULTS):
            cutoff, horizon = PROTOCOL_DEFAULTS[protocol]
            base = TrainConfig(
                protocol=protocol,  # type: ignore[arg-type]
                cutoff=cutoff,
                horizon_weeks=horizon,
                seeds=args.seeds,
                bootstrap=200,
                progress=False,
                channels=DEFAULT_CHANNELS,
            )
            cfg = dataclasses.replace(base, **VARIANTS[name])
            started = time.time()
            rep = train(cfg, Path("/tmp/ablate") / name / protocol)
            row = {
                "variant": name,
                "protocol": protocol,
                "seeds": args.seeds,
                "val_auc_mean_seed": round(sum(rep.per_seed_val_auc) / len(rep.per_seed_val_auc), 4),
                "test_auc": round(rep.models["cln"].roc_auc, 4),
                "test_brier": round(rep.models["cln"].brier, 4),
                "best_baseline_auc": round(rep.target.best_baseline_auc, 4),
                "best_baseline_brier": round(rep.target.best_baseline_brier, 4),
                "level": rep.target.level_with_best,
                "seconds": round(time.time() - started, 1),
            }
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
