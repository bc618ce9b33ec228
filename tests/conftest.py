"""Fixtures shared by the whole suite.

``tiny_model_dir`` trains a real (tiny) model through the real CLI on a slice of the real CDNOW
log, once per session: every end-to-end test, offline or online, runs against that file.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model_export.data import cdnow_path, load_transactions

SLICE_USERS = 3000
TINY_ARGS = (
    "--seeds", "2",
    "--origins", "2",
    "--epochs", "4",
    "--patience", "2",
    "--conv-channels", "4",
    "--hidden", "8",
    "--lookback-bins", "39",
    "--bootstrap", "100",
    "--no-progress",
)  # fmt: skip


@dataclass(frozen=True)
class TinyModel:
    dir: Path
    model: Path  # model.onnx
    scores: Path  # offline onnxruntime scores of the test customers: user_id, as_of, probability, label
    events: (
        Path  # the cleaned events the model was trained on: user_id, timestamp (RFC 3339), amount, quantity
    )
    raw: Path  # the CSV slice given to the CLI


def write_cdnow_slice(path: Path, n_users: int, seed: int = 0) -> Path:
    """A CSV in our own column names with every row of ``n_users`` random real CDNOW customers."""
    raw = pd.read_csv(cdnow_path(), sep=r"\s+", dtype=str)
    users = np.sort(raw["customer_id"].unique())
    chosen = set(np.random.default_rng(seed).choice(users, size=n_users, replace=False))
    part = raw[raw["customer_id"].isin(chosen)]
    out = pd.DataFrame(
        {
            "user_id": part["customer_id"],
            "timestamp": pd.to_datetime(part["date"], format="%Y%m%d").dt.strftime("%Y-%m-%d"),
            "amount": part["dollar_value"],
            "quantity": part["number_of_cds"],
        }
    )
    out.to_csv(path, index=False)
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_export", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``make test-fast`` must not train: a test that needs the tiny model has to be marked slow."""
    unmarked = [
        item.nodeid
        for item in items
        if "tiny_model_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"these tests train the tiny model, mark them @pytest.mark.slow: {unmarked}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny_model")
    raw = write_cdnow_slice(root / "cdnow_slice.csv", SLICE_USERS)
    out = root / "model"
    proc = run_cli("train", "--data", str(raw), *TINY_ARGS, "--out", str(out))
    if proc.returncode != 0:
        raise RuntimeError(f"tiny model training failed:\n{proc.stdout}\n{proc.stderr}")
    frame = load_transactions(raw).frame
    events = root / "events.csv"
    pd.DataFrame(
        {
            "user_id": frame["user_id"],
            "timestamp": pd.to_datetime(frame["timestamp"], unit="s", utc=True).dt.strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "amount": frame["amount"].map(repr),
            "quantity": frame["quantity"].astype(np.int64),
        }
    ).to_csv(events, index=False)
    return TinyModel(dir=out, model=out / "model.onnx", scores=out / "scores.csv", events=events, raw=raw)
