"""``python -m model_export train ...``: train, evaluate against the baselines, export one ONNX file."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from model_export.config import PROTOCOL_DEFAULTS, TrainConfig
from model_export.data import DataError
from service.features import ALL_CHANNELS, DEFAULT_CHANNELS


def _columns(value: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for part in filter(None, value.split(",")):
        key, sep, src = part.partition("=")
        if not sep or key.strip() not in ("user_id", "timestamp", "amount", "quantity"):
            raise argparse.ArgumentTypeError(
                f"bad column mapping {part!r}: use e.g. user_id=customer,timestamp=date"
            )
        mapping[key.strip()] = src.strip()
    return mapping


def _channels(value: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in value.split(",") if c.strip())
    unknown = [c for c in names if c not in ALL_CHANNELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown channels {unknown}; known: {', '.join(ALL_CHANNELS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train, evaluate and export DIR/model.onnx plus reports")
    t.add_argument("--data", default="cdnow", help="'cdnow' (bundled with lifetimes) or a CSV/Parquet path")
    t.add_argument(
        "--columns", type=_columns, default={}, help="map our names to yours: user_id=cust,timestamp=date,..."
    )
    t.add_argument("--protocol", choices=sorted(PROTOCOL_DEFAULTS), default="customer-split")
    t.add_argument("--cutoff", help="evaluation cutoff YYYY-MM-DD (inclusive); default per protocol")
    t.add_argument("--horizon-weeks", type=int, help="label window in weeks; default per protocol")
    t.add_argument("--seeds", type=int, default=1, help="ensemble this many seeds (averaged probabilities)")
    t.add_argument("--seed", type=int, default=0, help="first seed; also seeds the splits")
    t.add_argument("--lookback-bins", type=int, default=TrainConfig.lookback_bins)
    t.add_argument("--bin-days", type=int, default=TrainConfig.bin_days)
    t.add_argument(
        "--channels", type=_channels, default=DEFAULT_CHANNELS, help="comma-separated channel names"
    )
    t.add_argument("--conv-channels", type=int, default=TrainConfig.conv_channels)
    t.add_argument("--conv-layers", type=int, default=TrainConfig.conv_layers)
    t.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    t.add_argument("--dropout", type=float, default=TrainConfig.dropout)
    t.add_argument("--no-pool-last", dest="pool_last", action="store_false", help="drop last-step pooling")
    t.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    t.add_argument("--patience", type=int, default=TrainConfig.patience)
    t.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    t.add_argument("--lr", type=float, default=TrainConfig.lr)
    t.add_argument(
        "--origins",
        type=int,
        default=TrainConfig.origins,
        help="training cutoffs per customer (rolling origins)",
    )
    t.add_argument("--origin-step-weeks", type=int, default=TrainConfig.origin_step_weeks)
    t.add_argument("--max-users", type=int, help="train on a seeded sample of this many customers")
    t.add_argument("--bootstrap", type=int, default=TrainConfig.bootstrap, help="bootstrap resamples")
    t.add_argument("--no-progress", dest="progress", action="store_false")
    t.add_argument("--out", type=Path, required=True, help="output directory")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cutoff, horizon = PROTOCOL_DEFAULTS[args.protocol]
    return TrainConfig(
        data=args.data,
        columns=args.columns,
        protocol=args.protocol,
        cutoff=args.cutoff or cutoff,
        horizon_weeks=args.horizon_weeks or horizon,
        lookback_bins=args.lookback_bins,
        bin_days=args.bin_days,
        channels=args.channels,
        conv_channels=args.conv_channels,
        conv_layers=args.conv_layers,
        hidden=args.hidden,
        dropout=args.dropout,
        pool_last=args.pool_last,
        seeds=args.seeds,
        seed=args.seed,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        origins=args.origins,
        origin_step_weeks=args.origin_step_weeks,
        max_users=args.max_users,
        bootstrap=args.bootstrap,
        progress=args.progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the ONNX exporter's optimisation passes log every rewrite at INFO
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = config_from_args(args)
    # imported late: torch takes seconds to import, and --help should not wait for it
    from model_export.train import train

    try:
        report = train(cfg, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = report["models"]
    lines = [f"wrote {args.out / 'model.onnx'} ({report['model_version']})"]
    for name, m in models.items():
        lines.append(f"  {name:<11} AUC {m['roc_auc']:.4f}  PR-AUC {m['pr_auc']:.4f}  Brier {m['brier']:.4f}")
    for name, b in report["bootstrap"].items():
        lo, hi = b["ci95"]
        lines.append(f"  {name:<20} ΔAUC {b['auc_diff']:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
