"""``python -m model_export train|backtest|export|score``: train, evaluate against the baselines and
export one ONNX file; run the same recipe at monthly cutoffs; rebuild the ONNX file from a checkpoint;
score every user of a log with a model file."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_export.config import DEFAULT_PROTOCOL, PROTOCOL_DEFAULTS, EvaluationProtocol, TrainConfig
from model_export.data import DataError
from service.drift import ScoreReference
from service.features import ALL_CHANNELS, DEFAULT_CHANNELS

if TYPE_CHECKING:
    from model_export.score import ScoreReport


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


def _model_options(p: argparse.ArgumentParser) -> None:
    """Data, features, network and optimisation options, shared by ``train`` and ``backtest``."""
    p.add_argument("--data", default="cdnow", help="'cdnow' (bundled with lifetimes) or a CSV/Parquet path")
    p.add_argument(
        "--columns", type=_columns, default={}, help="map our names to yours: user_id=cust,timestamp=date,..."
    )
    p.add_argument("--seeds", type=int, default=1, help="ensemble this many seeds (averaged probabilities)")
    p.add_argument("--seed", type=int, default=0, help="first seed; also seeds the splits")
    p.add_argument("--lookback-bins", type=int, default=TrainConfig.lookback_bins)
    p.add_argument("--bin-days", type=int, default=TrainConfig.bin_days)
    p.add_argument(
        "--channels", type=_channels, default=DEFAULT_CHANNELS, help="comma-separated channel names"
    )
    p.add_argument("--conv-channels", type=int, default=TrainConfig.conv_channels)
    p.add_argument("--conv-layers", type=int, default=TrainConfig.conv_layers)
    p.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    p.add_argument("--dropout", type=float, default=TrainConfig.dropout)
    p.add_argument("--no-pool-last", dest="pool_last", action="store_false", help="drop last-step pooling")
    p.add_argument("--wide", action="store_true", help="add a linear term on the last step's channels")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--patience", type=int, default=TrainConfig.patience)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument(
        "--origins",
        type=int,
        default=TrainConfig.origins,
        help="training cutoffs per customer (rolling origins)",
    )
    p.add_argument("--origin-step-weeks", type=int, default=TrainConfig.origin_step_weeks)
    p.add_argument(
        "--crop-share",
        type=float,
        default=TrainConfig.crop_share,
        help="share of training batches shown a random recent part of the window (0 = never)",
    )
    p.add_argument(
        "--crop-min-bins", type=int, default=TrainConfig.crop_min_bins, help="shortest cropped window"
    )
    p.add_argument("--max-users", type=int, help="train on a seeded sample of this many customers")
    p.add_argument("--bootstrap", type=int, default=TrainConfig.bootstrap, help="bootstrap resamples")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", type=Path, required=True, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train, evaluate and export DIR/model.onnx plus reports")
    t.add_argument("--protocol", choices=sorted(PROTOCOL_DEFAULTS), default=DEFAULT_PROTOCOL)
    t.add_argument(
        "--cutoff",
        help="evaluation cutoff YYYY-MM-DD (inclusive), or 'latest': the last one the horizon allows; "
        "default per protocol",
    )
    t.add_argument("--horizon-weeks", type=int, help="label window in weeks; default per protocol")
    t.add_argument(
        "--backtest",
        type=Path,
        help="a backtest.json whose figures the report quotes as the estimate of how the model will do",
    )
    _model_options(t)
    b = sub.add_parser(
        "backtest", help="the out-of-time protocol at monthly evaluation cutoffs: DIR/backtest.{json,md,png}"
    )
    b.add_argument(
        "--horizon-weeks",
        type=int,
        default=PROTOCOL_DEFAULTS["out-of-time"][1],
        help="label window in weeks; the latest cutoff is this long before the end of the data",
    )
    b.add_argument(
        "--cutoffs",
        help="all monthly cutoffs (default), a count N spread over them (the latest always in), "
        "or comma-separated dates",
    )
    _model_options(b)
    b.set_defaults(bootstrap=1000)
    e = sub.add_parser(
        "export", help="rebuild model.onnx from a training run's checkpoint.pt (same graph and metadata)"
    )
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="DIR/checkpoint.pt written by train")
    source.add_argument(
        "--model",
        type=Path,
        help="an exported model.onnx to write again with --reference-scores (same graph), where its "
        "checkpoint cannot be exported",
    )
    e.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    e.add_argument(
        "--reference-scores",
        type=Path,
        help="the run's scores.csv: its probabilities become the file's drift reference (files "
        "trained before references were written have none)",
    )
    _score_options(
        sub.add_parser(
            "score", help="score every user of a log at one as_of: a Parquet file of probabilities"
        )
    )
    return parser


def _as_of(value: str) -> int:
    from model_export.score import parse_as_of

    try:
        return parse_as_of(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --as-of {value!r}: {exc}") from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number >= 1: {value!r}")
    return int(value)


def _score_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="the model.onnx to score with")
    p.add_argument(
        "--data", required=True, help="the log: 'cdnow' (bundled with lifetimes) or a CSV/Parquet path"
    )
    p.add_argument(
        "--columns", type=_columns, default={}, help="map our names to yours: user_id=cust,timestamp=date,..."
    )
    p.add_argument(
        "--as-of",
        type=_as_of,
        help="YYYY-MM-DD (the end of that UTC day) or RFC 3339 with an offset; "
        "default: the end of the UTC day of the log's last usable event",
    )
    p.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    p.add_argument("--chunk-rows", type=_positive, help="about this many log rows in memory at a time")
    p.add_argument(
        "--batch-users", type=_positive, help="users per onnxruntime call (default: the service's)"
    )
    p.add_argument(
        "--threads",
        type=_positive,
        help="onnxruntime intra-op threads (default: PI_INTRA_OP_THREADS or 1); "
        "with --engine ray, each actor's CPUs and threads (default 1)",
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: Ray Data, on the cluster RAY_ADDRESS names or a local one "
        "(needs the [ray] extra)",
    )
    p.add_argument(
        "--actors", type=_positive, help="with --engine ray: scoring actors (default: the cluster's CPUs)"
    )
    p.add_argument("--spill-dir", type=Path, help="where pass 1 spills the log (default: beside --out)")
    p.add_argument("--report", type=Path, help="also write the run's summary here, as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _score(args: argparse.Namespace) -> int:
    import json

    from model_export.score import BATCH_USERS, CHUNK_ROWS, open_model, score_log
    from service.artifact import ArtifactError
    from service.predictor import ProviderError

    if args.actors is not None and args.engine != "ray":
        print("error: --actors is for --engine ray", file=sys.stderr)
        return 2
    if args.engine == "ray" and find_spec("ray") is None:
        print("error: --engine ray needs the ray extra: pip install 'purchase-intent[ray]'", file=sys.stderr)
        return 2
    batch = args.batch_users or BATCH_USERS
    job: dict[str, Any] = {
        "as_of": args.as_of,
        "columns": args.columns,
        "chunk_rows": args.chunk_rows or CHUNK_ROWS,
        "batch_users": batch,
        "spill_dir": args.spill_dir,
        "progress": args.progress,
    }
    try:
        if args.engine == "ray":
            report = _score_ray(args, job)
        else:
            predictor = open_model(args.model, batch_users=batch, threads=args.threads)
            report = score_log(predictor, args.data, args.out, **job)
    except (DataError, ArtifactError, ProviderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report is not None:
        args.report.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    c = report.counts
    print(
        f"wrote {report.out}: {report.users:,} users at {report.as_of} ({report.model_version}), "
        f"{report.users_without_history:,} without usable history; {c.rows_read:,} rows read, "
        f"{c.rows_read - c.rows_kept:,} dropped by cleaning; "
        f"{report.seconds:.1f} s, {report.users_per_s:,.0f} users/s"
    )
    return 0


def _score_ray(args: argparse.Namespace, job: dict[str, Any]) -> ScoreReport:
    import ray

    from model_export.ray_engine import connect, score_log_ray

    started = connect()
    try:
        return score_log_ray(
            args.model, args.data, args.out, cpus_per_actor=args.threads or 1, actors=args.actors, **job
        )
    finally:
        if started:
            ray.shutdown()


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    protocol: EvaluationProtocol = getattr(args, "protocol", "out-of-time")
    cutoff, horizon = PROTOCOL_DEFAULTS[protocol]
    return TrainConfig(
        data=args.data,
        columns=args.columns,
        protocol=protocol,
        cutoff=getattr(args, "cutoff", None) or cutoff,
        horizon_weeks=args.horizon_weeks or horizon,
        lookback_bins=args.lookback_bins,
        bin_days=args.bin_days,
        channels=args.channels,
        conv_channels=args.conv_channels,
        conv_layers=args.conv_layers,
        hidden=args.hidden,
        dropout=args.dropout,
        pool_last=args.pool_last,
        wide=args.wide,
        seeds=args.seeds,
        seed=args.seed,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        origins=args.origins,
        origin_step_weeks=args.origin_step_weeks,
        crop_share=args.crop_share,
        crop_min_bins=args.crop_min_bins,
        max_users=args.max_users,
        bootstrap=args.bootstrap,
        progress=args.progress,
    )


def _reference(scores: Path) -> ScoreReference:
    """The drift reference of a ``scores.csv`` (its ``probability`` column)."""
    with scores.open(newline="") as fh:
        probabilities = [float(row["probability"]) for row in csv.DictReader(fh)]
    return ScoreReference.of(probabilities)


def _export(args: argparse.Namespace) -> int:
    from model_export.export import ExportError, add_reference, export_checkpoint, read_metadata

    source: Path = args.checkpoint if args.checkpoint is not None else args.model
    if not source.is_file():
        print(f"error: {'checkpoint' if args.checkpoint else 'model'} not found: {source}", file=sys.stderr)
        return 2
    if args.model is not None and args.reference_scores is None:
        print("error: --model rewrites a file with --reference-scores; give them both", file=sys.stderr)
        return 2
    try:
        reference = None if args.reference_scores is None else _reference(args.reference_scores)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: cannot read the reference scores {args.reference_scores}: {exc!r}", file=sys.stderr)
        return 2
    try:
        if args.model is not None:
            assert reference is not None
            add_reference(args.model, args.out, reference)
            version = read_metadata(args.out).model_version
            print(f"wrote {args.out} ({version}): the same graph, with a reference")
            return 0
        diff = export_checkpoint(args.checkpoint, args.out, reference)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    version = read_metadata(args.out).model_version
    print(f"wrote {args.out} ({version}); parity against the checkpoint {diff:.2g}")
    return 0


def _backtest(args: argparse.Namespace, cfg: TrainConfig) -> int:
    from model_export.backtest import MODELS, backtest

    result = backtest(cfg, args.out, cutoffs=args.cutoffs, n_boot=cfg.bootstrap)
    lines = [f"wrote {args.out / 'backtest.md'} ({len(result.cutoffs)} cutoffs, {result.seconds:.0f} s)"]
    lines.append("  cutoff      " + "".join(f"{m:>11}" for m in MODELS))
    for c in result.cutoffs:
        lines.append(f"  {c.cutoff}  " + "".join(f"{c.models[m].roc_auc:>11.4f}" for m in MODELS))
    s = result.summary
    lines.append("  mean        " + "".join(f"{s.mean_auc[m]:>11.4f}" for m in MODELS))
    lo, hi = s.mean_diff_vs_best["ci95"]
    lines.append(
        f"  cln - {s.best_baseline_by_mean_auc} (mean over cutoffs) {s.mean_diff_vs_best['auc_diff']:+.4f}"
        f" [{lo:+.4f}, {hi:+.4f}]; worst AUC gap {s.worst_auc_gap['gap']:+.4f} at {s.worst_auc_gap['where']}"
    )
    lines += [f"  {name}: {'met' if ok else 'MISSED'}" for name, ok in s.targets.items()]
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the ONNX exporter's optimisation passes log every rewrite at INFO
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "export":
        return _export(args)
    if args.command == "score":
        return _score(args)
    cfg = config_from_args(args)
    # imported late: torch takes seconds to import, and --help should not wait for it
    from model_export.train import train

    try:
        if args.command == "backtest":
            return _backtest(args, cfg)
        report = train(cfg, args.out, backtest=args.backtest)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = [f"wrote {args.out / 'model.onnx'} ({report.model_version})"]
    for name, m in report.models.items():
        lines.append(f"  {name:<11} AUC {m.roc_auc:.4f}  PR-AUC {m.pr_auc:.4f}  Brier {m.brier:.4f}")
    for name, b in report.bootstrap.items():
        lo, hi = b.ci95
        lines.append(f"  {name:<20} ΔAUC {b.auc_diff:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
